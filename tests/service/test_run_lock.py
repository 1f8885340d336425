"""A SIGKILLed `cxr-triage run` leaves nothing running, and one data dir has one system."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from pipeline.settings import Settings
from tests.conftest import run_cli
from tests.pacs import free_port
from tests.service.processes import (
    alive,
    running_children,
    start_run,
    wait_for,
    wait_for_workers,
    wait_serving,
)

pytestmark = pytest.mark.e2e


def test_killed_run_leaves_nothing_running_and_one_data_dir_has_one_system(
    tmp_path: Path, weights_file
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of `run` takes its children with it; the next `run` on the same data dir comes
    up, stopping what a dead run left; a concurrent second `run` refuses, naming the holder."""
    from pipeline.service.lifetime import process_start
    from pipeline.service.redis_server import EmbeddedRedis

    settings = Settings(
        data_dir=tmp_path / "data",
        weights=weights_file,
        port=free_port(),
        worker_processes=1,
        torch_threads=1,
    )
    log_path = tmp_path / "run.log"
    first = start_run(settings, log_path)
    started: list[subprocess.Popen] = [first]
    try:
        wait_serving(settings, first, log_path)
        parent = psutil.Process(first.pid)
        wait_for_workers(parent, 1)
        assert running_children(parent, "redis-server") and running_children(parent, "gunicorn")
        children = {p.pid for p in parent.children(recursive=True)}
        assert len(children) >= 4  # redis-server, a worker, gunicorn and its worker
        first.kill()
        first.wait(timeout=10)
        wait_for(lambda: not alive(children), 30, f"the children to go: {alive(children)}")

        # Leftovers a run that died might have left: a process it recorded as its own, and a
        # redis-server on the data dir's Redis files that no lock file knows of.
        recorded = subprocess.Popen(["sleep", "600"], start_new_session=True)
        started.append(recorded)
        lock = settings.data_dir / "run.lock"
        lock.write_text(
            json.dumps(
                {"pid": first.pid, "children": [[recorded.pid, process_start(recorded.pid)]]}
            )
        )
        orphan = EmbeddedRedis(settings.data_dir / "redis").start().process
        assert orphan is not None
        started.append(orphan)

        second = start_run(settings, log_path)
        started.append(second)
        wait_serving(settings, second, log_path)
        assert recorded.wait(timeout=30) is not None and orphan.wait(timeout=30) is not None
        assert f"left running: pids {min(recorded.pid, orphan.pid)}, " in log_path.read_text()
        assert len(running_children(psutil.Process(second.pid), "redis-server")) == 1

        third = run_cli(["run"], settings.with_(redis_url=None), timeout=120)
        assert third.returncode == 2, third.stdout + third.stderr
        assert f"in use by another cxr-triage run (pid {second.pid})" in third.stderr
        assert second.poll() is None
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
