"""Senders over the network: HTTP uploads to ``POST /api/studies`` and DICOM C-STORE.

Both behave like a well-made modality or router: bounded concurrency on loopback, and a retry
of the same file after a refused connection or a 5xx, until a deadline. A retry of a file that
was in fact stored comes back as a duplicate of the same image, so retrying is safe.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
PROCESSING_FAILURE = 0x0110  # the SCP could not store now (database down): send again


def multipart(filename: str, data: bytes, field_name: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body with one file; returns (body, Content-Type)."""
    boundary = "cxr" + secrets.token_hex(12)
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
        f'filename="{quoted}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(
    base_url: str, path: str, body: bytes, headers: dict[str, str], timeout: float = 60.0
) -> tuple[int, dict[str, Any]]:
    """POST raw bytes; (status, JSON body or {})."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        doc = {}
    return resp.status, doc if isinstance(doc, dict) else {}


def upload(base_url: str, token: str, filename: str, data: bytes) -> tuple[int, dict[str, Any]]:
    """One study through ``POST /api/studies`` with a feed token."""
    body, ctype = multipart(filename, data)
    return post(
        base_url, "/api/studies", body, {"Authorization": f"Bearer {token}", "Content-Type": ctype}
    )


@dataclass
class Outcome:
    """What one sender achieved: file -> image id, plus retries and failures."""

    image_ids: dict[Path, int] = field(default_factory=dict)
    sop_uids: dict[Path, str] = field(default_factory=dict)
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HttpSender:
    """``threads`` uploaders draining a queue of files; retry on refusal or 5xx."""

    def __init__(
        self,
        base_url: str,
        token: str,
        paths: list[Path],
        threads: int = 4,
        give_up_after_s: float = 120.0,
    ) -> None:
        self.base_url, self.token = base_url, token
        self.todo: queue.Queue[Path] = queue.Queue()
        for p in paths:
            self.todo.put(p)
        self.give_up_after_s = give_up_after_s
        self.outcome = Outcome()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> HttpSender:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or 1e9)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            try:
                path = self.todo.get_nowait()
            except queue.Empty:
                return
            self._send(path)

    def _send(self, path: Path) -> None:
        data, deadline = path.read_bytes(), time.monotonic() + self.give_up_after_s
        while True:
            status = 0
            try:
                status, doc = upload(self.base_url, self.token, path.name, data)
                if status < 500 and doc.get("image_id") is not None:
                    with self.outcome.lock:
                        self.outcome.image_ids[path] = int(doc["image_id"])
                    return
                why = f"HTTP {status}: {doc.get('error', '')}"
            except (OSError, http.client.HTTPException) as exc:
                # Refused, reset, or the answer cut off mid-body (IncompleteRead): the dashboard
                # is restarting. Send again; de-duplication makes a repeat harmless.
                why = type(exc).__name__
            # A 4xx without an image is the sender's fault: retrying would not help.
            if 400 <= status < 500 or time.monotonic() > deadline:
                with self.outcome.lock:
                    self.outcome.errors.append(f"{path.name}: {why}")
                return
            with self.outcome.lock:
                self.outcome.retries += 1
            time.sleep(0.3)


class ScpSender:
    """One DICOM association at a time, many C-STOREs per association; retry on failure."""

    def __init__(
        self,
        port: int,
        paths: list[Path],
        give_up_after_s: float = 120.0,
        ae_title: str = "CXRTRIAGE",
    ) -> None:
        self.port, self.paths, self.ae_title = port, paths, ae_title
        self.give_up_after_s = give_up_after_s
        self.outcome = Outcome()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ScpSender:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        import pydicom
        from pynetdicom import AE, StoragePresentationContexts

        ae = AE(ae_title="RELIABILITY")
        ae.requested_contexts = StoragePresentationContexts
        pending = list(self.paths)
        deadline = time.monotonic() + self.give_up_after_s
        while pending and time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
            if not assoc.is_established:
                self.outcome.retries += 1
                time.sleep(0.5)
                continue
            try:
                while pending:
                    ds = pydicom.dcmread(pending[0])
                    status = assoc.send_c_store(ds)
                    code = getattr(status, "Status", None)
                    if code is None:  # association dropped
                        self.outcome.retries += 1
                        break
                    if code == PROCESSING_FAILURE:  # "storage failed; try again later"
                        self.outcome.retries += 1
                        time.sleep(0.3)
                    else:  # stored, or refused for good with a reason
                        self.outcome.sop_uids[pending.pop(0)] = str(ds.SOPInstanceUID)
            finally:
                if assoc.is_established:
                    assoc.release()
        self.outcome.errors += [f"{p.name}: never stored" for p in pending]
