"""Paced senders: studies over HTTP or C-STORE at a steady rate, generated as they go."""

from __future__ import annotations

import io
import logging
import threading
import time

import pydicom  # imported here, once: threads importing it at the same moment can see it half made
from pynetdicom import AE, StoragePresentationContexts

from reliability.netsend import PROCESSING_FAILURE, upload
from reliability.samples import PhiRegistry, chest_like, dicom_bytes, png_bytes
from reliability.system import System

log = logging.getLogger(__name__)


class PacedSender:
    """Send studies number ``start + k*step`` at ``t0 + k/rate`` over HTTP or C-STORE."""

    def __init__(
        self,
        system: System,
        kind: str,
        numbers: list[int],
        rate: float,
        phi: PhiRegistry,
        give_up_after_s: float,
    ) -> None:
        self.system, self.kind, self.numbers, self.rate = system, kind, numbers, rate
        self.phi, self.give_up_after_s = phi, give_up_after_s
        self.image_ids: list[int] = []
        self.sop_uids: list[str] = []
        self.sent = 0
        self.retries = 0
        self.errors: list[str] = []
        self.late_s = 0.0  # how far behind its schedule the sender fell, at most
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, t0: float) -> PacedSender:
        self.t0 = t0
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _study(self, n: int) -> tuple[str, bytes]:
        arr = chest_like(seed=n)
        if self.kind == "http" and n % 2:
            return f"soak-{n}.png", png_bytes(arr)
        return f"soak-{n}.dcm", dicom_bytes(arr, self.phi.new_patient(n))

    def _run(self) -> None:
        try:
            if self.kind == "http":
                self._run_http()
            else:
                self._run_scp()
        except Exception as exc:  # a sender that dies is counted, never silently short
            log.exception("soak sender %s died", self.kind)
            self.errors.append(f"{self.kind} sender died: {type(exc).__name__}: {exc}")

    def _wait_turn(self, k: int) -> None:
        due = self.t0 + k / self.rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            self.late_s = max(self.late_s, now - due)

    def _run_http(self) -> None:
        token = self.system.accounts["feed"][2]
        for k, n in enumerate(self.numbers):
            self._wait_turn(k)
            name, data = self._study(n)
            deadline = time.monotonic() + self.give_up_after_s
            while True:
                try:
                    status, doc = upload(self.system.base_url, token, name, data)
                except OSError as exc:
                    status, doc = 0, {"error": type(exc).__name__}
                if status in (200, 202) and doc.get("image_id"):
                    self.image_ids.append(int(doc["image_id"]))
                    self.sent += 1
                    break
                if 400 <= status < 500 or time.monotonic() > deadline:
                    self.errors.append(f"{name}: HTTP {status} {doc.get('error', '')}"[:120])
                    break
                self.retries += 1
                time.sleep(0.3)

    def _run_scp(self) -> None:
        ae = AE(ae_title="RELIABILITY")
        ae.requested_contexts = StoragePresentationContexts
        assoc = None
        try:
            for k, n in enumerate(self.numbers):
                self._wait_turn(k)
                _, data = self._study(n)
                ds = pydicom.dcmread(io.BytesIO(data))
                deadline = time.monotonic() + self.give_up_after_s
                while True:
                    if assoc is None or not assoc.is_established:
                        assoc = ae.associate(
                            "127.0.0.1", self.system.scp_port, ae_title="CXRTRIAGE"
                        )
                    code = (
                        getattr(assoc.send_c_store(ds), "Status", None)
                        if assoc.is_established
                        else None
                    )
                    if code is not None and code != PROCESSING_FAILURE:
                        if code == 0:
                            self.sop_uids.append(str(ds.SOPInstanceUID))
                            self.sent += 1
                        else:
                            self.errors.append(f"C-STORE {n}: status 0x{code:04X}")
                        break
                    if time.monotonic() > deadline:
                        self.errors.append(f"C-STORE {n}: never stored")
                        break
                    self.retries += 1
                    time.sleep(0.3)
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
