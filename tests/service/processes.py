"""`cxr-triage run` and `worker` seen from a test: start and wait for them, find their children."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

from pipeline.queue.dispatch import HEARTBEAT_PREFIX, redis_client
from pipeline.settings import Settings
from tests.conftest import REPO, settings_env


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"timed out waiting for {what}")


def running_children(
    proc: psutil.Process, name: str, recursive: bool = True
) -> list[psutil.Process]:
    """Live (not zombie) descendants whose command line mentions name."""
    out = []
    for child in proc.children(recursive=recursive):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and name in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


def celery_children(proc: psutil.Process) -> list[psutil.Process]:
    return running_children(proc, "celery")


def wait_for_workers(parent: psutil.Process, n: int, exclude: int | None = None):  # type: ignore[no-untyped-def]
    """Wait until exactly n Celery processes run under parent (none of them pid exclude)."""

    def exactly() -> list[psutil.Process] | None:
        found = [p for p in celery_children(parent) if p.pid != exclude]
        return found if len(found) == n else None

    return wait_for(exactly, 60, f"{n} workers")


def wait_heartbeats(redis_url: str, n: int, timeout: float) -> None:
    """Wait until n workers beat in the run's Redis."""
    beats = redis_client(redis_url)
    try:
        wait_for(
            lambda: len(beats.keys(HEARTBEAT_PREFIX + "*")) == n,
            timeout,
            "a heartbeat from every worker",
        )
    finally:
        beats.close()


def start_run(settings: Settings, log_path: Path) -> subprocess.Popen:
    """`cxr-triage run` on the settings' data dir with an embedded Redis, output to log_path."""
    env = settings_env(settings)
    env.pop("CXR_REDIS_URL", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli.main", "run"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_serving(settings: Settings, run: subprocess.Popen, log_path: Path) -> None:
    def healthy() -> bool:
        assert run.poll() is None, log_path.read_text()[-3000:]
        try:
            url = f"http://127.0.0.1:{settings.port}/healthz"
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    wait_for(healthy, 120, "the dashboard")


def alive(pids: set[int]) -> set[int]:
    """Those of pids that are still running (zombies are gone for this purpose)."""
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out
