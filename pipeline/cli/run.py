"""``cxr-triage run``: the whole system on one machine (Redis, workers, dashboard, sources,
the results sender), supervised, with the recovery passes on a timer."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline import migrate
from pipeline.classifier.weights import describe_weights
from pipeline.cli.outbox import sender_command
from pipeline.cli.sources import source_children
from pipeline.db import session_factory, session_scope
from pipeline.queue.locate import clear_runtime, write_runtime
from pipeline.service.lifetime import RunLock, wait_port_free
from pipeline.service.recovery import (
    DEAD_WORKER_CHECK_S,
    RECONCILE_EVERY_S,
    reconcile_once,
    rescue_dead_workers,
    watch_workers,
)
from pipeline.service.redis_server import EmbeddedRedis
from pipeline.service.supervisor import Supervisor, child_env, dashboard_command, worker_children
from pipeline.settings import Settings
from pipeline.states import Role
from pipeline.store.instances import InstanceStore
from pipeline.users import create_user, has_users


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run the whole system: Redis, worker, dashboard")
    run.add_argument("--port", type=int)
    run.set_defaults(handler=cmd_run)


@contextmanager
def system_redis(settings: Settings) -> Iterator[tuple[str, EmbeddedRedis | None]]:
    """The configured Redis, or an embedded one for the duration of the block."""
    if settings.redis_url:
        yield settings.redis_url, None
        return
    embedded = EmbeddedRedis(settings.data_dir / "redis").start()
    try:
        yield embedded.url, embedded
    finally:
        embedded.stop()


def first_run_admin(settings: Settings) -> None:
    """Create an admin account when none exists and say how to log in."""
    with session_scope(session_factory(settings)) as session:
        if has_users(session):
            return
        password = os.environ.get("CXR_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        create_user(session, "admin", password, Role.ADMIN)
    print(f"Created the first account.  Username: admin   Password: {password}", flush=True)
    print("Add more with: cxr-triage users create NAME --role radiologist --password-stdin")


def expire_store(settings: Settings) -> dict[str, int]:
    """One retention pass over the instance store (``pipeline.store.retention.expire``)."""
    from pipeline.store.retention import expire

    return expire(session_factory(settings), InstanceStore.of(settings), settings)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    # One system per data directory: a second run refuses, naming the pid that holds it.
    lock = RunLock(settings.data_dir)
    leftovers = lock.acquire()
    if leftovers:
        print(
            f"stopped processes a cxr-triage run that died left running: pids "
            f"{', '.join(map(str, leftovers))}",
            file=sys.stderr,
        )
    try:
        return _run_system(settings, lock)
    finally:
        lock.release()


def _run_system(settings: Settings, lock: RunLock) -> int:
    wait_port_free(settings.host, settings.port)
    migrate.upgrade(settings.db_url)
    first_run_admin(settings)
    model = describe_weights(settings)
    if not model["trained"]:
        print("WARNING: untrained model in use: predictions are random.", file=sys.stderr)
    with system_redis(settings) as (redis_url, embedded):

        def redis_pid() -> int | None:
            return embedded.process.pid if embedded and embedded.process else None

        lock.record([pid] if (pid := redis_pid()) else [])
        dashboard_url = f"http://{settings.host}:{settings.port}"
        write_runtime(settings, redis_url, dashboard_url)
        env = child_env(settings, redis_url)
        sup = Supervisor(
            checks=[embedded.keep_alive] if embedded else [],
            on_pids=lock.record,
            extra_pids=[redis_pid],
        )
        for name, command, child in worker_children(settings, env):
            sup.add(name, command, child)
        watch_workers(sup, settings, redis_url)
        sup.add("dashboard", dashboard_command(settings), env)
        for name, command in source_children(settings):  # watched folder, DICOM listener
            sup.add(name, command, env)
        sup.add("send-results", sender_command(settings), env)  # results and alerts out
        first_pass = [True]

        def reconcile() -> None:
            # The first pass, just after the children start (not before: a restart after a
            # crash should not wait for it), sends anything left queued by a standalone ingest,
            # a lost Redis or a run that died, whatever its age.
            if first_pass:
                reconcile_once(settings, redis_url, stuck_after_s=0)
                first_pass.clear()  # done: a pass that raised is tried again next period
            else:
                reconcile_once(settings, redis_url)

        print(f"cxr-triage is running: open {dashboard_url}  (Ctrl-C stops everything)", flush=True)
        try:
            sup.run(
                tick=reconcile,
                tick_every=RECONCILE_EVERY_S,
                ticks=[
                    (DEAD_WORKER_CHECK_S, lambda: rescue_dead_workers(settings, redis_url)),
                    (settings.store_expire_every_s, lambda: expire_store(settings)),
                ],
            )
        finally:
            clear_runtime(settings)
    print("cxr-triage stopped.")
    return 0
