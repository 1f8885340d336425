"""The harness as ``cxr-triage run``'s supervisor: restart any child that exits, as run does.

The fault rows restart what they kill themselves; rows where a child may die of the fault
(a worker whose Redis refuses writes on a full disk, or that gives up reconnecting) run under
this loop, with run's policy: re-send a dead worker's claims first, back off 2 s when a child
died within 5 s of its start.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from reliability.metrics import Row
from reliability.samples import PhiRegistry
from reliability.services import Service
from reliability.system import System

log = logging.getLogger(__name__)


class Supervising:
    """A thread restarting the system's dead workers, dashboard and DICOM listener."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.restarts: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Supervising:
        now = time.monotonic()
        self._started = {s.name: now for s in self._children()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _children(self) -> list[Service]:
        s = self.system
        return [c for c in (*s.workers, s.dashboard, s.scp) if c is not None]

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for child in self._children():
                if child.alive() or self._stop.is_set():
                    continue
                log.warning("%s exited; restarting it as run does", child.name)
                if child in self.system.workers:
                    try:
                        self.system.worker_died(child)
                    except Exception as exc:  # Redis or the database unavailable: heartbeat
                        log.info(
                            "re-sending %s's claims failed: %s", child.name, type(exc).__name__
                        )
                if time.monotonic() - self._started.get(child.name, 0.0) < 5:
                    time.sleep(2)
                child.start()
                self._started[child.name] = time.monotonic()
                self.restarts[child.name] = self.restarts.get(child.name, 0) + 1

    def summary(self) -> str:
        if not self.restarts:
            return "no child exited"
        return "restarted " + ", ".join(f"{n} {k}x" for n, k in sorted(self.restarts.items()))


def phi_in_logs(system: System, phi: PhiRegistry) -> list[str]:
    """The row's log files holding any of its fake patient names or ids (one pattern: a row's
    thousands of patients make the security row's string-by-string search too slow)."""
    pattern = re.compile(rf"ZZTEST|ZZPID|{re.escape(phi.run_tag)}\d{{5}}")
    hits = []
    for path in system.log_files():
        with open(path, errors="replace") as fh:
            if any(pattern.search(line) for line in fh):
                hits.append(f"PHI in {path.relative_to(system.workdir)}")
    return hits


@contextmanager
def supervised_row(row: Row, system: System, phi: PhiRegistry, what: str) -> Iterator[Supervising]:
    """Start the system under supervision for one row; an error fails the row, not the run.

    Whatever happens, the system is stopped and its logs are searched for the row's PHI.
    """
    supervisor: Supervising | None = None
    try:
        system.start()
        supervisor = Supervising(system).__enter__()
        yield supervisor
    except Exception as exc:
        log.exception("%s row failed", what)
        row.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        if supervisor is not None:
            supervisor.__exit__()
        system.stop()
        row.failures += phi_in_logs(system, phi)
