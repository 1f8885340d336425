"""One system per data directory: children that die with their supervisor, a run lock, and the
clean-up of what a dead ``cxr-triage run`` left behind."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

from pipeline.settings import ConfigError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when its starter dies (Linux).

    The signal follows the *thread* that starts the child, so start children from the thread
    that lives as long as the system (the supervisor's main thread). SIGKILL, not SIGTERM: a
    child that is hung or slow to stop must still not outlive a supervisor that is gone; the
    database is the source of truth and the next run re-sends unfinished work.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = _libc().prctl  # resolved before the fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the starter died before the death signal was set
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot), None when there is none.

    A pid with the same start time is the same process, not a later one given a reused pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _stop(pids: list[int], timeout: float = 10.0) -> None:
    # Each child leads its own process group: the group takes its own children with it.
    starts = {pid: process_start(pid) for pid in pids}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if starts[pid] is not None and process_start(pid) == starts[pid]:
                try:
                    os.killpg(pid, sig)
                except OSError:
                    os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(process_start(pid) != starts[pid] for pid in pids):
                return
            time.sleep(0.1)


def redis_servers_on(directory: Path) -> list[int]:
    """Pids of redis-server processes keeping their files in directory.

    Found by their working directory (redis-server changes into its ``--dir``), since the
    server rewrites its command line.
    """
    found, target = [], str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "redis-server":
                if os.readlink(entry / "cwd") == target:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def wait_port_free(host: str, port: int, timeout: float = 5.0) -> None:
    """Wait briefly for the port (a dying dashboard lets go of it); refuse if it stays taken."""
    deadline = time.monotonic() + timeout
    while port_in_use(host, port):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"port {port} on {host} is already in use, perhaps by the dashboard of an "
                f"earlier cxr-triage run. Find it with `ss -ltnp 'sport = :{port}'` and stop "
                "it, or start this one with --port N"
            )
        time.sleep(0.2)


class RunLock:
    """An exclusive lock on ``DATA_DIR/run.lock``, held for the life of ``cxr-triage run``.

    The file names the holder and the pids of its processes, so a second run can say who holds
    the directory, and a run after one that died can stop what it left running.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "run.lock"
        self.fd: int | None = None

    def _read(self, fd: int) -> dict:
        try:
            return dict(json.loads(os.pread(fd, 65536, 0) or b"{}"))
        except (OSError, ValueError, TypeError):
            return {}

    def acquire(self) -> list[int]:
        """Take the lock or refuse; stop a dead run's leftovers; return the pids stopped."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._read(fd).get("pid", "unknown")
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(
                f"the data directory {self.data_dir} is in use by another cxr-triage run "
                f"(pid {holder}). Stop that one first (Ctrl-C in its terminal, or kill {holder}),"
                " or give this one another CXR_DATA_DIR"
            ) from None
        self.fd = fd
        recorded = [
            pid for pid, start in self._read(fd).get("children", []) if process_start(pid) == start
        ]
        leftovers = sorted(set(recorded) | set(redis_servers_on(self.data_dir / "redis")))
        if leftovers:
            log.warning("stopping processes left running by a dead run: %s", leftovers)
            _stop(leftovers)
        self.record([])
        return leftovers

    def record(self, pids: list[int]) -> None:
        """Write down this run's pid and the pids of its processes."""
        if self.fd is None:
            return
        children = [[pid, start] for pid in pids if (start := process_start(pid)) is not None]
        data = json.dumps({"pid": os.getpid(), "children": children}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Forget the processes (all stopped by now) and let go of the directory."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None
