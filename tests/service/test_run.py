"""`cxr-triage run`: embedded Redis, first admin, supervision, a clean Ctrl-C, and a killed
worker's batch re-sent at once.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline.service.supervisor import inference_layout
from pipeline.settings import Settings
from tests.conftest import REPO, chest_like, png_bytes, run_cli, settings_env
from tests.pacs import free_port
from tests.service.processes import (
    celery_children,
    running_children,
    start_run,
    wait_for,
    wait_for_workers,
    wait_heartbeats,
    wait_serving,
)

pytestmark = pytest.mark.e2e


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
        wait_heartbeats(runtime["redis_url"], layout.processes, 60)

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
        wait_heartbeats(runtime["redis_url"], layout.processes, 90)
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
