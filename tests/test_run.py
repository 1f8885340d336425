"""`cxr-triage run`: embedded Redis, first admin, supervision, and a clean Ctrl-C."""

from __future__ import annotations

import http.cookiejar
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline.queue import HEARTBEAT_PREFIX, redis_client
from pipeline.settings import Settings
from pipeline.supervisor import inference_layout
from tests.conftest import REPO, chest_like, png_bytes, run_cli, settings_env

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def test_run_serves_supervises_and_stops_cleanly(
    tmp_path: Path, weights_file, study_folder
) -> None:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "data", weights=weights_file, port=port,
                        batch_size=4, batch_wait_ms=100)  # fmt: skip
    env = settings_env(settings)
    env.pop("CXR_REDIS_URL", None)
    env["CXR_ADMIN_PASSWORD"] = "first-admin-password"
    log = open(tmp_path / "run.log", "w+")
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--port", str(port)],
                           env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    parent = psutil.Process(run.pid)
    descendants: set[int] = set()
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(base + "/healthz", timeout=2).status == 200
            except OSError:
                return False

        wait_for(healthy, 120, "the dashboard")
        # The machine's worker layout: on this CPU, a process per core, one thread each.
        layout = inference_layout(settings)
        workers = wait_for_workers(parent, layout.processes)
        assert {p.environ()["CXR_TORCH_THREADS"] for p in workers} == {str(layout.threads)}
        output = Path(log.name).read_text()
        assert "Username: admin   Password: first-admin-password" in output
        runtime = json.loads((settings.data_dir / "runtime.json").read_text())
        assert runtime["redis_url"].startswith("redis://127.0.0.1:")
        beats = redis_client(runtime["redis_url"])
        wait_for(lambda: len(beats.keys(HEARTBEAT_PREFIX + "*")) == layout.processes, 60,
                 "a heartbeat from every worker")  # fmt: skip
        beats.close()

        # `ingest` finds the running system through the data dir.
        ingest_settings = settings.with_(redis_url=None)
        proc = run_cli(["ingest", str(study_folder), "--wait", "--json"], ingest_settings)
        assert proc.returncode == 0, proc.stderr[-2000:] + Path(log.name).read_text()[-3000:]
        doc = json.loads(proc.stdout)
        assert (doc["accepted"], doc["done"], len(doc["rejected"])) == (3, 3, 1)

        # Log in as the first admin and read the worklist through the API.
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        html = opener.open(base + "/login").read().decode()
        token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
        form = urllib.parse.urlencode({"username": "admin", "password": "first-admin-password",
                                       "csrf_token": token}).encode()  # fmt: skip
        opener.open(base + "/login", data=form)
        api = json.loads(opener.open(base + "/api/worklist").read())
        priorities = [s["priority"] for s in api["studies"] if s["priority"] is not None]
        assert len(priorities) == 3 and priorities == sorted(priorities, reverse=True)

        # A worker that dies is restarted; the others keep running.
        first, *others = celery_children(parent)
        descendants.update(p.pid for p in parent.children(recursive=True))
        first.kill()
        replaced = wait_for_workers(parent, layout.processes, exclude=first.pid)
        assert {p.pid for p in others} <= {p.pid for p in replaced}
        descendants.update(p.pid for p in parent.children(recursive=True))

        # The embedded Redis is brought back on the same port; new work still flows.
        redis_proc = running_children(parent, "redis-server", recursive=False)[0]
        redis_proc.kill()
        wait_for(
            lambda: [p for p in running_children(parent, "redis-server", recursive=False)
                     if p.pid != redis_proc.pid],
            30, "a new redis-server",
        )  # fmt: skip
        more = tmp_path / "more"
        more.mkdir()
        (more / "late.png").write_bytes(png_bytes(chest_like(seed=9)))
        late = run_cli(
            ["ingest", str(more), "--wait", "--json", "--timeout", "120"], ingest_settings
        )
        assert late.returncode == 0, late.stderr[-2000:] + Path(log.name).read_text()[-3000:]
        assert json.loads(late.stdout)["done"] == 1
        descendants.update(p.pid for p in parent.children(recursive=True))
    finally:
        descendants.update(p.pid for p in parent.children(recursive=True) if p.is_running())
        run.send_signal(signal.SIGINT)
        try:
            code = run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            raise
        log.close()
    assert code == 0, Path(log.name).read_text()[-3000:]
    time.sleep(0.5)
    alive = [pid for pid in descendants if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
    assert alive == [], f"left running: {alive}"
    assert not (settings.data_dir / "runtime.json").exists()


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
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"],
                            env=settings_env(settings), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
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
    assert [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status()
            != psutil.STATUS_ZOMBIE] == []  # fmt: skip
