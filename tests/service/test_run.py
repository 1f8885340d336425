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

from pipeline.queue.dispatch import HEARTBEAT_PREFIX, redis_client
from pipeline.service.supervisor import inference_layout
from pipeline.settings import Settings
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
    settings = Settings(
        data_dir=tmp_path / "data", weights=weights_file, port=port, batch_size=4, batch_wait_ms=100
    )
    env = settings_env(settings)
    env.pop("CXR_REDIS_URL", None)
    env["CXR_ADMIN_PASSWORD"] = "first-admin-password"
    log = open(tmp_path / "run.log", "w+")
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "run", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
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
        wait_for(
            lambda: len(beats.keys(HEARTBEAT_PREFIX + "*")) == layout.processes,
            60,
            "a heartbeat from every worker",
        )
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
        form = urllib.parse.urlencode(
            {"username": "admin", "password": "first-admin-password", "csrf_token": token}
        ).encode()
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
            lambda: [
                p
                for p in running_children(parent, "redis-server", recursive=False)
                if p.pid != redis_proc.pid
            ],
            30,
            "a new redis-server",
        )
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
    alive = [
        pid
        for pid in descendants
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
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


def test_killed_run_leaves_nothing_running_and_one_data_dir_has_one_system(
    tmp_path: Path, weights_file
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of `run` takes its children with it; the next `run` on the same data dir comes
    up, stopping what a dead run left; a concurrent second `run` refuses, naming the holder."""
    from pipeline.queue.redis_server import EmbeddedRedis
    from pipeline.service.lifetime import process_start

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


def test_a_killed_workers_batch_is_re_sent_at_once_under_the_shipped_defaults(
    tmp_path: Path, weights_file
) -> None:  # type: ignore[no-untyped-def]
    """`run` as `make run` starts it (stuck timeout 600 s, kombu's visibility timeout 300 s):
    a worker SIGKILLed mid-batch, twice. `run` sees each exit and re-sends what that worker
    had claimed, so every image ends done, with one prediction, long before either timeout."""
    from sqlalchemy import func, select

    from pipeline.db import make_engine, make_session_factory
    from pipeline.models import Image, Prediction

    settings = Settings(data_dir=tmp_path / "data", weights=weights_file, port=free_port())
    assert (settings.stuck_after_s, settings.batch_size) == (600, 16)  # the shipped defaults
    log_path = tmp_path / "run.log"
    run = start_run(settings, log_path)
    try:
        wait_serving(settings, run, log_path)
        parent = psutil.Process(run.pid)
        layout = inference_layout(settings)
        wait_for_workers(parent, layout.processes)
        runtime = json.loads((settings.data_dir / "runtime.json").read_text())
        beats = redis_client(runtime["redis_url"])
        wait_for(
            lambda: len(beats.keys(HEARTBEAT_PREFIX + "*")) == layout.processes,
            90,
            "a heartbeat from every worker",
        )
        beats.close()
        folder = tmp_path / "in"
        folder.mkdir()
        for seed in range(96):
            (folder / f"s{seed:03d}.png").write_bytes(png_bytes(chest_like(size=160, seed=seed)))
        sent = run_cli(["ingest", str(folder), "--json"], settings.with_(redis_url=None))
        assert sent.returncode == 0 and json.loads(sent.stdout)["accepted"] == 96, sent.stderr
        factory = make_session_factory(make_engine(settings.db_url))

        def claims() -> list[tuple[int, str]]:
            with factory() as session:
                return list(
                    session.execute(
                        select(Image.id, Image.worker).where(
                            Image.status == "processing", Image.worker.is_not(None)
                        )
                    ).all()
                )

        held: list[int] = []
        for _ in range(2):
            node = wait_for(claims, 120, "a batch in flight")[0][1]
            victim = next(
                p
                for p in celery_children(parent)
                if node.startswith(
                    p.cmdline()[p.cmdline().index("--hostname") + 1].split("@")[0] + "@"
                )
            )
            victim.suspend()  # frozen: what it holds now is what it dies holding
            mine = [i for i, w in claims() if w == node]
            victim.kill()
            held += mine
            wait_for_workers(parent, layout.processes, exclude=victim.pid)
        assert held, "the killed workers held no claimed images"

        def all_final() -> bool:
            with factory() as session:
                open_ = session.scalar(
                    select(func.count(Image.id)).where(
                        Image.status.in_(("received", "queued", "processing"))
                    )
                )
            return open_ == 0

        # Far inside kombu's 300 s visibility timeout and the 600 s stuck timeout.
        wait_for(all_final, 180, "every image final")
        with factory() as session:
            statuses = dict(
                session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
            )
            per_image = dict(
                session.execute(
                    select(Prediction.image_id, func.count()).group_by(Prediction.image_id)
                ).all()
            )
            attempts = dict(
                session.execute(select(Image.id, Image.attempts).where(Image.id.in_(held))).all()
            )
        assert statuses == {"done": 96}
        assert len(per_image) == 96 and set(per_image.values()) == {1}
        assert min(attempts.values()) >= 2, attempts  # each killed claim really ran again
        assert "images dead workers held" in log_path.read_text()
    finally:
        run.send_signal(signal.SIGINT)
        try:
            assert run.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            run.kill()
            raise
