"""The ``cxr-triage run`` supervisor SIGKILLed mid-load and started again on its data dir.

Not the harness's System: the real ``cxr-triage run`` with nothing set but its data directory
(and, on the PostgreSQL profile, ``CXR_DATABASE_URL``), so the shipped defaults are what is
measured. Studies go in through ``cxr-triage ingest`` in chunks, as a modality's script would
send them, and keep going in while ``run`` is dead (they are committed as queued: the
database is the source of truth). ``run`` is SIGKILLed while batches are processing; its
children must go with it, and a ``run`` started again at once (as a service manager restarts
it) must come up on the same data dir — no second Redis, the dashboard's port free — and
finish every study, each with one result.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, select

from pipeline.db import make_engine, make_session_factory
from pipeline.models import Image
from pipeline.service.lifetime import process_start, redis_servers_on
from pipeline.settings import Settings
from reliability.faults import Plan
from reliability.metrics import Row, fill, wait_final, work_counters
from reliability.samples import PhiRegistry, write_studies
from reliability.services import Profile, free_port, wait_healthz

log = logging.getLogger(__name__)
ROW = "run supervisor SIGKILL mid-load, restarted"


def _cxr_triage() -> list[str]:
    """The installed console script, as an operator runs it."""
    script = Path(sys.executable).with_name("cxr-triage")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli.main"]


class RunProcess:
    """One ``cxr-triage run`` in its own session, its output appended to a log."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env, self.port, self.log_path = env, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RunProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [*_cxr_triage(), "run", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_serving(self, timeout: float = 180.0) -> None:
        base = f"http://127.0.0.1:{self.port}"
        wait_healthz(base, timeout, "cxr-triage run not serving", self._running)

    def _running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"cxr-triage run exited; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _alive(pids: list[tuple[int, int]]) -> list[int]:
    return [pid for pid, start in pids if process_start(pid) == start]


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process under root (children, grandchildren...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        start = process_start(pid)
        if start is not None:
            found.append((pid, start))
        todo += parents.get(pid, [])
    return found


def _log_count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0


class IngestSender:
    """``cxr-triage ingest CHUNK --json`` per chunk, from a thread; retried on any error."""

    def __init__(self, chunks: list[Path], env: dict[str, str], pause_s: float) -> None:
        self.chunks, self.env, self.pause_s = chunks, env, pause_s
        self.study_ids: set[int] = set()
        self.retries = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> IngestSender:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        for chunk in self.chunks:
            for _ in range(60):
                proc = subprocess.run(
                    [*_cxr_triage(), "ingest", str(chunk), "--json"],
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                if proc.returncode == 0:
                    doc = json.loads(proc.stdout)
                    self.study_ids.update(s["id"] for s in doc["studies"])
                    break
                self.retries += 1
                time.sleep(0.5)
            else:
                self.errors.append(f"gave up on {chunk.name}")
            time.sleep(self.pause_s)


def run_kill_row(profile: Profile, plan: Plan, phi: PhiRegistry, workdir: Path) -> Row:
    """SIGKILL ``cxr-triage run`` while studies are sent and processed; start it again."""
    row = Row(ROW, profile.name)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        CXR_DATA_DIR=str(data), CXR_ADMIN_PASSWORD=secrets.token_urlsafe(12), PYTHONUNBUFFERED="1"
    )
    if "CXR_WEIGHTS" in os.environ:  # the operator's model, as every row uses
        env["CXR_WEIGHTS"] = os.environ["CXR_WEIGHTS"]
    if profile.database_url:
        env["CXR_DATABASE_URL"] = profile.database_url
    settings = Settings.from_env(env)
    # Chunks of 8 studies, a pause between them: the load is still arriving at the kill.
    paths = write_studies(workdir / "studies", plan.studies, phi, start=900_000)
    chunks = []
    for n in range(0, len(paths), 8):
        chunk = workdir / "chunks" / f"{n // 8:04d}"
        chunk.mkdir(parents=True, exist_ok=True)
        for path in paths[n : n + 8]:
            os.link(path, chunk / path.name)
        chunks.append(chunk)
    port = free_port()
    log_path = workdir / "run.log"
    first = RunProcess(env, port, log_path).start()
    second: RunProcess | None = None
    sender: IngestSender | None = None
    try:
        first.wait_serving()
        factory = make_session_factory(make_engine(settings.db_url))
        before = work_counters(factory)
        sender = IngestSender(chunks, env, pause_s=0.5).start()

        def counts() -> dict[str, int]:
            with factory() as session:
                return dict(
                    session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
                )

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            now = counts()
            if now.get("done", 0) and now.get("processing", 0) and sender.alive():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"never saw batches processing while the load arrived: {now}")
        assert first.proc is not None
        # Every process of the system: run's children and theirs (gunicorn's worker).
        children = _descendants(first.proc.pid)
        first.proc.kill()  # the supervisor only: what its children do next is the product's
        fault_at = time.monotonic()
        first.proc.wait(timeout=10)
        at_kill = counts()
        while _alive(children) and time.monotonic() - fault_at < 10:
            time.sleep(0.05)
        survivors = _alive(children)
        gone_s = time.monotonic() - fault_at
        second = RunProcess(env, port, log_path).start()  # restarted at once
        # Serving: the new dashboard answers (not a dying one of the killed run).
        while _log_count(log_path, "started dashboard") < 2:
            if time.monotonic() - fault_at > 180 or second.proc.poll() is not None:  # type: ignore[union-attr]
                raise RuntimeError(f"the restarted run never started its dashboard; see {log_path}")
            time.sleep(0.05)
        second.wait_serving()
        up_s = time.monotonic() - fault_at
        sender.join(plan.recover_timeout_s)
        ids: list[int] = []
        with factory() as session:
            ids = list(
                session.scalars(
                    select(Image.id).where(Image.study_id.in_(sorted(sender.study_ids)))
                )
            )
        finished = wait_final(factory, ids, plan.recover_timeout_s)
        row.recover_s = time.monotonic() - fault_at if finished else None
        fill(row, factory, ids, len(paths), before)
        redis_count = len(redis_servers_on(data / "redis"))
        text = log_path.read_text(errors="replace")
        cleaned = "left running: pids" in text
        row.failures += sender.errors
        if not finished:
            row.failures.append(f"not all final after {plan.recover_timeout_s:.0f} s")
        if survivors:
            row.failures.append(f"{len(survivors)} of the killed run's processes outlived it")
        if redis_count != 1:
            row.failures.append(f"{redis_count} redis-servers on the data dir's Redis files")
        row.note = (
            f"{len(children)} processes of the killed run gone in {gone_s:.1f} s, "
            f"{'leftovers stopped by the next run; ' if cleaned else ''}"
            f"restarted run serving {up_s:.1f} s after the kill; at the kill "
            f"{at_kill.get('processing', 0)} processing, {at_kill.get('done', 0)} done; "
            f"ingest retried {sender.retries}x; shipped defaults"
        )
    finally:
        if sender is not None:
            sender.join(1)
        for run in (second, first):
            if run is not None:
                run.stop()
    return row
