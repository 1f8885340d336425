"""What the results tests share: destinations to add, the rows and objects a pass made,
and waiting for a sender to get somewhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.db import session_scope
from pipeline.models import Study, utcnow
from pipeline.results.destinations import Spec, apply, parse_url
from pipeline.results.dicom_objects import SOP_SC, SOP_SR
from pipeline.settings import Settings
from pipeline.tables_results import Destination, OutboxItem, ResultObject
from tests import pacs
from tests.conftest import REPO, settings_env

N_STUDIES = 8  # an SR and a capture each: 16 objects per destination


class RedisTrap:
    """A TCP port posing as Redis that counts every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


class SenderProcess:
    """A real ``cxr-triage send-results`` process."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli.main", "send-results", "--every", "0.5"],
                env=settings_env(settings),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def add_destination(factory: Any, settings: Settings, spec: Spec) -> int:
    with session_scope(factory) as session:
        row = apply(settings, Destination(source="console", enabled=True), spec)
        row.created_at = utcnow() - timedelta(days=1)  # before the studies finished
        session.add(row)
        session.flush()
        return int(row.id)


def dicom_dest(orthanc: pacs.OrthancServer) -> Spec:
    return parse_url(f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")


def stow_dest(orthanc: pacs.OrthancServer) -> Spec:
    spec = parse_url(orthanc.dicomweb_url)
    spec.auth, spec.username, spec.secret = "basic", pacs.USER, pacs.PASSWORD
    return spec


def objects(factory: Any) -> list[ResultObject]:
    with factory() as session:
        return list(session.scalars(select(ResultObject).order_by(ResultObject.id)))


def outbox(factory: Any) -> list[OutboxItem]:
    with factory() as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def dicom_study(factory: Any) -> Study:
    with factory() as session:
        return session.scalars(select(Study).where(Study.study_uid.is_not(None))).one()


def wait_for(check: Callable[[], Any], what: str, timeout: float, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def stored_uids(orthanc: pacs.OrthancServer) -> list[str]:
    """SOP Instance UIDs of our SRs and captures in Orthanc, one entry per stored instance."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    tags = [orthanc.get(f"/instances/{i['ID']}/simplified-tags") for i in found]
    return sorted(t["SOPInstanceUID"] for t in tags if t.get("SOPClassUID") in (SOP_SR, SOP_SC))


def count_stored(orthanc: pacs.OrthancServer) -> int:
    try:
        return int(orthanc.get("/statistics")["CountInstances"])
    except OSError:
        return 0


def ready_uids(factory: Any) -> list[str]:
    with factory() as session:
        return sorted(
            session.scalars(
                select(ResultObject.uid).where(
                    ResultObject.status == "ready", ResultObject.kind.in_(("sr", "sc"))
                )
            )
        )


def all_sent(factory: Any, n: int) -> Callable[[], bool]:
    return lambda: [r.status for r in outbox(factory)] == ["sent"] * n
