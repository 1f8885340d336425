"""The system under test: real Redis, database, Celery worker, dashboard and reconciler.

The harness is its own supervisor (as ``cxr-triage run`` is) so it can kill, cut and restart
each part on purpose. Every process writes to a log file under the run's directory: the PHI
scan reads them all at the end.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from pipeline.classifier.weights import ensure_weights
from pipeline.db import make_engine, make_session_factory, session_scope
from pipeline.migrate import upgrade
from pipeline.models import PERSON_ROLES, ROLES
from pipeline.service.recovery import (
    DEAD_WORKER_CHECK_S,
    RECONCILE_EVERY_S,
    reconcile_once,
    rescue_dead_workers,
)
from pipeline.service.redis_server import EmbeddedRedis
from pipeline.service.supervisor import dashboard_command, worker_children, worker_nodename
from pipeline.settings import Settings
from pipeline.users import create_user, issue_token
from reliability.services import ComposeRedis, Profile, Service, free_port, wait_healthz
from reliability.tcp_proxy import TcpProxy

log = logging.getLogger(__name__)
SHIPPED = Settings()  # the defaults: what `make run` runs with
SHIPPED_STUCK_AFTER_S = SHIPPED.stuck_after_s
RUN_RECONCILE_EVERY_S = RECONCILE_EVERY_S  # `cxr-triage run`'s full reconciler pass


class System:
    """Start, fault and stop the parts; count nothing (see reliability.metrics)."""

    def __init__(
        self,
        profile: Profile,
        workdir: Path,
        stuck_after_s: int | None = None,
        data_root: Path | None = None,
        partitionable: bool = False,
    ) -> None:
        self.profile, self.workdir = profile, workdir
        # Where the data lives (SQLite, the data dir, Redis's files): a small mount for the
        # disk-full row, else the run directory. Logs stay under workdir.
        self.data_root = data_root or workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        redis_cls = ComposeRedis if profile.redis == "compose" else EmbeddedRedis
        self.redis: EmbeddedRedis = redis_cls(self.data_root / "redis")
        self.proxy: TcpProxy | None = None
        # With partitionable: the workers reach Redis, and the dashboard the database (a
        # server only), each through a proxy of their own that a partition row cuts.
        self.partitionable = partitionable
        self.worker_redis_proxy: TcpProxy | None = None
        self.dashboard_db_proxy: TcpProxy | None = None
        self.extra_env: dict[str, str] = {}  # added to every child's environment
        self.stuck_after_s = SHIPPED_STUCK_AFTER_S if stuck_after_s is None else stuck_after_s
        # True (every row): reconcile as `cxr-triage run` does with the shipped settings (the
        # dead-worker check every 5 s, a full pass every 60 s with the 600 s stuck timeout), so
        # a row measures what a department gets. False: a full pass every second with
        # stuck_after_s, for experiments only.
        self.shipped_timeouts = True
        self.settings: Settings | None = None
        # The inference workers of the machine's layout, as `cxr-triage run` starts them.
        self.workers: list[Service] = []
        self.dashboard: Service | None = None
        self.scp: Service | None = None
        self.scp_port = 0
        # role -> (username, password or None, API token)
        self.accounts: dict[str, tuple[str, str | None, str]] = {}
        self.base_url = ""
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None
        self.factory: sessionmaker[Session] | None = None

    def _database_url(self) -> str:
        url = self.profile.database_url
        if url is None:
            return f"sqlite:///{self.data_root / 'reliability.db'}"
        # Everything reaches PostgreSQL through a proxy the harness can cut.
        host = url.split("@", 1)[-1].split("/", 1)[0]
        name, _, port = host.partition(":")
        self.proxy = TcpProxy((name, int(port or 5432))).up()
        return url.replace(host, f"127.0.0.1:{self.proxy.port}")

    def start(self) -> System:
        self.redis.start()
        # The operator's CXR_WEIGHTS (or the shipped model) is used; everything else is private.
        settings = Settings.from_env().with_(
            data_dir=self.data_root / "data",
            database_url=self._database_url(),
            redis_url=self.redis.url,
            port=free_port(),
            # `make run`'s settings, whatever the caller's environment says.
            batch_size=SHIPPED.batch_size,
            batch_wait_ms=SHIPPED.batch_wait_ms,
            stuck_after_s=self.stuck_after_s,
            hung_after_s=SHIPPED.hung_after_s,
            max_attempts=SHIPPED.max_attempts,
            # Small limits keep the oversized-upload checks cheap; the code paths are the same.
            max_file_mb=16,
            max_request_mb=24,
        )
        settings = settings.with_(weights=ensure_weights(settings))
        self.settings = settings
        upgrade(settings.db_url)
        self.factory = make_session_factory(make_engine(settings.db_url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(settings.as_env(), PYTHONUNBUFFERED="1", **self.extra_env)
        worker_env, dashboard_env = self._partitionable_envs(env)
        self.workers = [
            Service(name, command, child_env, self.logs / f"{name}.log")
            for name, command, child_env in worker_children(settings, worker_env, "reliability")
        ]
        self.dashboard = Service(
            "dashboard", dashboard_command(settings), dashboard_env, self.logs / "dashboard.log"
        )
        self.base_url = f"http://127.0.0.1:{settings.port}"
        self.scp_port = free_port()
        self.scp = Service(
            "dicom-listen",
            [
                sys.executable,
                "-m",
                "pipeline.cli.main",
                "dicom-listen",
                "--port",
                str(self.scp_port),
            ],
            env,
            self.logs / "dicom-listen.log",
        )
        self._create_accounts()
        log_sizes = [w.log_path.stat().st_size if w.log_path.exists() else 0 for w in self.workers]
        for worker in self.workers:
            worker.start()
        self.dashboard.start()
        self.scp.start()
        for worker, since in zip(self.workers, log_sizes, strict=True):
            self.wait_worker_ready(worker, since=since)
        self.wait_dashboard()
        self.wait_scp()
        self._reconciler = threading.Thread(target=self._reconcile_loop, daemon=True)
        self._reconciler.start()
        return self

    def _partitionable_envs(self, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """The workers' and the dashboard's environments: through their own proxies if asked."""
        assert self.settings is not None and self.settings.redis_url
        if not self.partitionable:
            return env, env
        self.worker_redis_proxy = TcpProxy(("127.0.0.1", self.redis.port)).up()
        worker_env = {**env, "CXR_REDIS_URL": f"redis://127.0.0.1:{self.worker_redis_proxy.port}/0"}
        dashboard_env = env
        if self.profile.database_url is not None:
            upstream = self.profile.database_url.split("@", 1)[-1].split("/", 1)[0]
            name, _, port = upstream.partition(":")
            self.dashboard_db_proxy = TcpProxy((name, int(port or 5432))).up()
            host = self.settings.db_url.split("@", 1)[-1].split("/", 1)[0]
            dashboard_env = {
                **env,
                "CXR_DATABASE_URL": self.settings.db_url.replace(
                    host, f"127.0.0.1:{self.dashboard_db_proxy.port}"
                ),
            }
        return worker_env, dashboard_env

    def _reconcile_loop(self) -> None:
        """What ``cxr-triage run`` does (see ``shipped_timeouts``), or every second here."""
        assert self.settings is not None
        shipped = self.settings.with_(stuck_after_s=SHIPPED_STUCK_AFTER_S)
        last_check = last_full = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                now = time.monotonic()
                if not self.shipped_timeouts:
                    reconcile_once(self.settings, self.redis.url)
                elif now - last_full >= RUN_RECONCILE_EVERY_S:
                    last_full = last_check = now
                    reconcile_once(shipped, self.redis.url)
                elif now - last_check >= DEAD_WORKER_CHECK_S:
                    last_check = now
                    rescue_dead_workers(shipped, self.redis.url)
            except Exception as exc:  # Redis or the database down: try again next tick
                log.info("reconcile skipped: %s", type(exc).__name__)

    def worker_died(self, worker: Service) -> None:
        """What ``cxr-triage run`` does when it sees a worker child exit: re-send its claims."""
        assert self.settings is not None
        name = worker_nodename(worker.command)
        if name is not None:
            rescue_dead_workers(self.settings, self.redis.url, dead=(name,))

    def _create_accounts(self) -> None:
        """One account per role; people get a password, every account a token."""
        assert self.factory is not None
        with session_scope(self.factory) as session:
            for role in ROLES:
                password = secrets.token_urlsafe(12) if role in PERSON_ROLES else None
                user = create_user(session, f"reliability-{role}", password, role)
                self.accounts[role] = (user.username, password, issue_token(session, user))

    def wait_scp(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.scp is not None
            if not self.scp.alive():
                raise RuntimeError("dicom-listen exited at start; see " + str(self.scp.log_path))
            try:
                socket.create_connection(("127.0.0.1", self.scp_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("dicom-listen not accepting connections")

    @property
    def worker(self) -> Service | None:
        """The first inference worker: the one fault scenarios kill."""
        return self.workers[0] if self.workers else None

    def wait_worker_ready(self, worker: Service, since: int, timeout: float = 120.0) -> None:
        """Wait for "ready." in the worker's log after byte offset ``since``."""
        size = since
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not worker.alive():
                raise RuntimeError("worker exited at start; see " + str(worker.log_path))
            with open(worker.log_path, "rb") as fh:
                fh.seek(size)
                if b" ready." in fh.read():
                    return
            time.sleep(0.2)
        raise TimeoutError("worker not ready")

    def wait_dashboard(self, timeout: float = 60.0) -> None:
        wait_healthz(self.base_url, timeout, "dashboard not answering /healthz")

    def restart_worker(self, worker: Service) -> None:
        since = worker.log_path.stat().st_size if worker.log_path.exists() else 0
        worker.start()
        self.wait_worker_ready(worker, since=since)

    def crash_redis(self) -> None:
        """SIGKILL redis-server and start it again on the same port from its AOF."""
        proc = self.redis.process
        assert proc is not None
        proc.kill()
        proc.wait(timeout=10)
        self.redis.process = None
        self.redis.start()

    def log_files(self) -> list[Path]:
        """Every log written by the run (processes, Redis, the harness itself)."""
        return sorted(p for p in self.workdir.rglob("*.log") if p.is_file())

    def stop(self) -> None:
        self._stop.set()
        if self._reconciler is not None:
            self._reconciler.join(timeout=30)
        for service in (self.scp, self.dashboard, *self.workers):
            if service is not None:
                service.stop()
        self.redis.stop()
        for proxy in (self.proxy, self.worker_redis_proxy, self.dashboard_db_proxy):
            if proxy is not None:
                proxy.down()

    def __enter__(self) -> System:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
