"""`cxr-triage worker`: three processes that share the work and stop together."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, chest_like, png_bytes, run_cli, settings_env
from tests.service.processes import wait_for, wait_for_workers

pytestmark = pytest.mark.e2e


def test_worker_command_runs_three_processes_that_share_the_work_and_stop_together(
    tmp_path: Path, settings, study_folder
) -> None:  # type: ignore[no-untyped-def]
    """`cxr-triage worker` with CXR_WORKER_PROCESSES=3 (the docker-compose worker on a CPU):
    three Celery processes, one thread each, all consuming; SIGTERM stops every one."""
    from sqlalchemy import func, select

    from pipeline.db import make_engine, make_session_factory
    from pipeline.migrate import upgrade
    from pipeline.models import Batch, Image

    settings = settings.with_(worker_processes=3, device="cpu")
    upgrade(settings.db_url)
    log = open(tmp_path / "worker.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "worker"],
        env=settings_env(settings),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    parent = psutil.Process(proc.pid)
    try:
        workers = wait_for_workers(parent, 3)
        hostnames = {p.cmdline()[p.cmdline().index("--hostname") + 1] for p in workers}
        assert hostnames == {"cxr-worker-0@%h", "cxr-worker-1@%h", "cxr-worker-2@%h"}
        assert {p.environ()["CXR_TORCH_THREADS"] for p in workers} == {"1"}
        wait_for(lambda: Path(log.name).read_text().count(" ready.") >= 3, 90, "workers ready")
        done = run_cli(["ingest", str(study_folder), "--wait", "--json"], settings)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["done"] == 3
        # A backlog bigger than one worker's prefetch (one batch of 4) is spread over them.
        backlog = tmp_path / "backlog"
        backlog.mkdir()
        for seed in range(24):
            (backlog / f"b{seed}.png").write_bytes(png_bytes(chest_like(seed=100 + seed)))
        more = run_cli(["ingest", str(backlog), "--wait", "--json"], settings)
        assert more.returncode == 0 and json.loads(more.stdout)["done"] == 24, more.stderr[-2000:]
        factory = make_session_factory(make_engine(settings.db_url))
        with factory() as session:
            assert session.scalar(select(func.count(Image.id)).where(Image.status == "done")) == 27
            names = set(session.scalars(select(Batch.worker)))
        assert len(names) >= 2, names
        pids = [p.pid for p in workers]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, Path(log.name).read_text()[-3000:]
    time.sleep(0.5)
    assert [
        p
        for p in pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ] == []
