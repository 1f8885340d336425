"""The ``cxr-triage`` command."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline import migrate
from pipeline.classifier.weights import describe_weights, ensure_weights
from pipeline.cli.sources import source_children
from pipeline.db import make_engine, make_session_factory, session_scope
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import Enqueuer, IngestReport, ingest_paths
from pipeline.models import FINAL_STATES, PERSON_ROLES, ROLES, Study
from pipeline.queue.dispatch import Dispatcher, QueueFull, queue_has_room, redis_client
from pipeline.queue.reconcile import redis_restarted, requeue_dead_workers, requeue_stuck
from pipeline.queue.redis_server import (
    EmbeddedRedis,
    clear_runtime,
    resolve_redis_url,
    write_runtime,
)
from pipeline.service.lifetime import RunLock, wait_port_free
from pipeline.service.supervisor import (
    Child,
    Supervisor,
    dashboard_command,
    worker_children,
    worker_nodename,
)
from pipeline.settings import ConfigError, Settings
from pipeline.states import Role, State
from pipeline.storage import StorageFull
from pipeline.store.instances import InstanceStore
from pipeline.triage.studies import worklist_document
from pipeline.users import UserError, create_user, has_users, issue_token

log = logging.getLogger("cxr-triage")
# How often `run` (and a multi-process `worker`) looks for workers whose heartbeat expired.
DEAD_WORKER_CHECK_S = 5.0
# How often `run` makes a full reconciler pass, and the age past which a queued image whose
# task message is nowhere in Redis is re-sent (its sender died between commit and send).
RECONCILE_EVERY_S = 10.0
LOST_MESSAGE_AFTER_S = 10.0
EXIT_STORAGE_FULL = 4  # `ingest`: the disk holding the database is full
EXIT_QUEUE_FULL = 5  # `ingest`: Redis is at its maxmemory and refuses writes


@cache
def _factory_for(url: str) -> Any:
    return make_session_factory(make_engine(url))


def _factory(settings: Settings) -> Any:
    # One engine per database for the life of the process: `run` checks every few seconds.
    return _factory_for(settings.db_url)


def _limits(settings: Settings) -> Limits:
    return Limits(settings.max_file_mb * 1024 * 1024, settings.max_pixels, settings.modalities)


def _child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    # Children resolve nothing themselves: same data dir, database, Redis and weights.
    resolved = settings.with_(redis_url=redis_url, weights=ensure_weights(settings))
    return {**os.environ, **resolved.as_env(), "PYTHONUNBUFFERED": "1"}


def reconcile_once(
    settings: Settings,
    redis_url: str,
    stuck_after_s: float | None = None,
    held_after_s: float | None = None,
) -> dict:
    """Re-send unfinished work found in the database (see pipeline.queue.reconcile).

    ``processing`` past the stuck timeout, and ``queued`` past ``LOST_MESSAGE_AFTER_S`` (or
    the stuck timeout, if shorter) with no task message in Redis.
    """
    stuck_s = settings.stuck_after_s if stuck_after_s is None else stuck_after_s
    rescued = rescue_dead_workers(settings, redis_url, held_after_s=held_after_s)
    model = describe_weights(settings)
    client, dispatcher = redis_client(redis_url), Dispatcher(redis_url)
    try:
        stuck = requeue_stuck(
            _factory(settings),
            client,
            dispatcher,
            stuck_after_s=stuck_s,
            queued_after_s=min(stuck_s, LOST_MESSAGE_AFTER_S),
            max_attempts=settings.max_attempts,
            input_size=model["input_size"],
            ttl_s=settings.payload_ttl_s,
            thresholds=model["thresholds"],
            held_after_s=held_after_s,
            preprocess=model["preprocess"],
        )
    finally:
        dispatcher.close()
        client.close()
    return {k: rescued[k] + stuck[k] for k in ("requeued", "failed")}


def rescue_dead_workers(
    settings: Settings,
    redis_url: str,
    dead: tuple[str, ...] = (),
    held_after_s: float | None = None,
) -> dict:
    """Re-send at once what dead workers held: those named, and any whose heartbeat expired.

    When Redis is another process than at the last check (it crashed and was restarted), the
    queued images whose messages it lost are re-sent too.
    """
    model = describe_weights(settings)
    client, dispatcher = redis_client(redis_url), Dispatcher(redis_url)
    try:
        if redis_restarted(client, redis_url):
            log.warning("Redis was restarted: re-sending queued work whose message it lost")
            requeue_stuck(
                _factory(settings),
                client,
                dispatcher,
                stuck_after_s=settings.stuck_after_s,
                queued_after_s=0,
                max_attempts=settings.max_attempts,
                input_size=model["input_size"],
                ttl_s=settings.payload_ttl_s,
                thresholds=model["thresholds"],
                preprocess=model["preprocess"],
            )
        return requeue_dead_workers(
            _factory(settings),
            client,
            dispatcher,
            max_attempts=settings.max_attempts,
            input_size=model["input_size"],
            ttl_s=settings.payload_ttl_s,
            thresholds=model["thresholds"],
            dead=dead,
            preprocess=model["preprocess"],
            hung_after_s=settings.hung_after_s,
            **({} if held_after_s is None else {"held_after_s": held_after_s}),
        )
    finally:
        dispatcher.close()
        client.close()


def watch_workers(sup: Supervisor, settings: Settings, redis_url: str) -> None:
    """Have sup re-send a worker child's claimed work the moment it exits."""

    def on_exit(child: Child) -> None:
        if (name := worker_nodename(child.command)) is not None:
            rescue_dead_workers(settings, redis_url, dead=(name,))

    sup.on_exit = on_exit


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
    with session_scope(_factory(settings)) as session:
        if has_users(session):
            return
        password = os.environ.get("CXR_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        create_user(session, "admin", password, Role.ADMIN)
    print(f"Created the first account.  Username: admin   Password: {password}", flush=True)
    print("Add more with: cxr-triage users create NAME --role radiologist --password-stdin")


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
        env = _child_env(settings, redis_url)
        sup = Supervisor(
            checks=[embedded.keep_alive] if embedded else [],
            on_pids=lock.record,
            extra_pids=[redis_pid],
        )
        for name, command, child_env in worker_children(settings, env):
            sup.add(name, command, child_env)
        watch_workers(sup, settings, redis_url)
        sup.add("dashboard", dashboard_command(settings), env)
        for name, command in source_children(settings):  # watched folder, DICOM listener
            sup.add(name, command, env)
        from pipeline.cli.outbox import sender_command

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


def expire_store(settings: Settings) -> dict[str, int]:
    """One retention pass over the instance store (``pipeline.store.instances.expire``)."""
    from pipeline.store.instances import expire

    return expire(_factory(settings), InstanceStore.of(settings), settings)


def _wait_final(settings: Settings, study_ids: set[int], timeout: float) -> bool:
    factory = _factory(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(factory) as session:
            rows = session.execute(select(Study.status).where(Study.id.in_(study_ids))).all()
        if all(status in FINAL_STATES for (status,) in rows):
            return True
        time.sleep(0.25)
    return False


def _ingest_json(settings: Settings, report: IngestReport) -> dict[str, Any]:
    ids = {i.study_id for i in report.items if i.study_id is not None}
    with session_scope(_factory(settings)) as session:
        studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(ids)))}
    accepted = [studies[i.study_id] for i in report.accepted if i.study_id in studies]
    return {
        "accepted": len(report.accepted),
        "duplicates": len(report.duplicates),
        "rejected": [{"path": i.path, "reason": i.reason} for i in report.rejected],
        "done": sum(1 for s in accepted if s.status == State.DONE),
        "failed": sum(1 for s in accepted if s.status == State.FAILED),
        "studies": [
            {
                "id": s.id,
                "path": i.path,
                "status": s.status,
                # Why a study is skipped, rejected or failed: the text the worklist shows.
                "reason": s.reason,
                "label": s.label,
                "p_abnormal": None if s.p_abnormal is None else round(s.p_abnormal, 4),
                "priority": s.priority,
            }
            for i in report.items
            if i.study_id in studies
            for s in [studies[i.study_id]]
        ],
    }


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(settings.db_url)
    factory = _factory(settings)
    redis_url = resolve_redis_url(settings)
    temp: Supervisor | None = None
    embedded: EmbeddedRedis | None = None
    client = dispatcher = None
    ok = True
    full: StorageFull | QueueFull | None = None
    try:
        if redis_url is None and args.wait:
            # No running system: bring up a private Redis and one worker for this command.
            embedded = EmbeddedRedis(settings.data_dir / "redis-ingest").start()
            redis_url = embedded.url
            # Their banners and logs go to a file: stdout is this command's own output.
            temp = Supervisor(log_path=settings.data_dir / "ingest-workers.log")
            env = _child_env(settings, redis_url)
            for name, command, child_env in worker_children(settings, env, "cxr-ingest"):
                temp.add(name, command, child_env).start()
        sink = None
        if redis_url is not None:
            client, dispatcher = redis_client(redis_url), Dispatcher(redis_url)
            model, ttl = describe_weights(settings), settings.payload_ttl_s
            sink = Enqueuer(
                factory,
                client,
                dispatcher,
                model["input_size"],
                ttl,
                lane=args.lane,
                preprocess=model["preprocess"],
            )

        try:
            if client is not None and not queue_has_room(client):
                raise QueueFull()  # refused before anything is stored
            report = ingest_paths(
                factory,
                [Path(p) for p in args.paths],
                _limits(settings),
                source="cli",
                lane=args.lane,
                sink=sink,
                store=InstanceStore.of(settings),
            )
        except (StorageFull, QueueFull) as exc:
            full, report = exc, exc.report or IngestReport()
        queued = [i for i in report.accepted if i.status == State.QUEUED]
        if redis_url is None and queued:
            print(
                f"{len(queued)} images queued in the database; no system is running, so they "
                "will be classified when `cxr-triage run` starts",
                file=sys.stderr,
            )
        if args.wait and redis_url is not None and full is None:
            ids = {i.study_id for i in report.accepted if i.study_id is not None}
            ok = _wait_final(settings, ids, args.timeout)
    finally:
        if dispatcher is not None:
            dispatcher.close()
        if client is not None:
            client.close()
        if temp is not None:
            temp.stop_all()
        if embedded is not None:
            embedded.stop()
    doc = _ingest_json(settings, report)
    if full is not None:
        # The files stored before the disk (or the queue) filled stand; the rest were not.
        doc["error"] = str(full)
        print(
            f"cxr-triage: {full}; {doc['accepted']} files were stored before that, "
            "the rest were not",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"accepted {doc['accepted']}, duplicates {doc['duplicates']}, "
            f"rejected {len(doc['rejected'])}, done {doc['done']}, failed {doc['failed']}"
        )
        for r in doc["rejected"]:
            print(f"  rejected {r['path']}: {r['reason']}")
    if full is not None:
        return EXIT_QUEUE_FULL if isinstance(full, QueueFull) else EXIT_STORAGE_FULL
    if not ok:
        print(f"timed out after {args.timeout:.0f} s waiting for results", file=sys.stderr)
        if temp is not None:
            print(f"the workers' log: {temp.log_path}", file=sys.stderr)
        return 3
    return 0


def cmd_worklist(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(settings.db_url)
    model = describe_weights(settings)
    with session_scope(_factory(settings)) as session:
        doc = worklist_document(session, model, args.limit)
    if args.json:
        print(json.dumps(doc))
        return 0
    if not model["trained"]:
        print("UNTRAINED MODEL: priorities below are random and must not be used for triage.")
    print(
        f"{'id':>6} {'priority':>8} {'triage':<9} {'label':<10} {'p_abn':>6} {'status':<10} received"
    )
    for s in doc["studies"]:
        prio = "-" if s["priority"] is None else f"{s['priority']:.1f}"
        p = "-" if s["p_abnormal"] is None else f"{s['p_abnormal']:.3f}"
        print(
            f"{s['id']:>6} {prio:>8} {s['triage_class'] or '-':<9} {s['label'] or '-':<10} "
            f"{p:>6} {s['status']:<10} {s['received_at']}"
        )
    return 0


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(settings.db_url)
    from pipeline.models import User

    with session_scope(_factory(settings)) as session:
        if args.users_cmd == "create":
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
            if not password and args.role in PERSON_ROLES:
                raise UserError("give the password on standard input with --password-stdin")
            create_user(session, args.username, password, args.role)
            print(f"created {args.role} {args.username}")
        else:
            user = session.scalars(select(User).where(User.username == args.username)).first()
            if user is None:
                raise UserError(f"no user {args.username!r}")
            print(issue_token(session, user))
    return 0


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    redis_url = resolve_redis_url(settings)
    if redis_url is None:
        raise ConfigError("no Redis: set CXR_REDIS_URL or start `cxr-triage run`")
    while True:
        print(json.dumps(reconcile_once(settings, redis_url, args.older_than)), flush=True)
        if not args.every:
            return 0
        time.sleep(args.every)


def cmd_exec(command: list[str], settings: Settings) -> int:
    redis_url = resolve_redis_url(settings)
    if redis_url is None:
        raise ConfigError("no Redis: set CXR_REDIS_URL or start `cxr-triage run`")
    env = _child_env(settings, redis_url)
    os.execvpe(command[0], command, env)
    return 1  # not reached


def cmd_worker(settings: Settings) -> int:
    """The inference workers of this machine's layout; one process replaces this one."""
    redis_url = resolve_redis_url(settings)
    if redis_url is None:
        raise ConfigError("no Redis: set CXR_REDIS_URL or start `cxr-triage run`")
    children = worker_children(settings, _child_env(settings, redis_url))
    if len(children) == 1:
        _, command, env = children[0]
        os.execvpe(command[0], command, env)
    sup = Supervisor()
    for name, command, env in children:
        sup.add(name, command, env)
    watch_workers(sup, settings, redis_url)
    sup.run()
    return 0


# Commands that live in their own modules. Each module defines
# ``register(subparsers) -> None``, adding its parsers with ``set_defaults(handler=fn)`` where
# ``fn(args, settings) -> int``. Imported only when the CLI builds its parser.
COMMAND_MODULES: tuple[str, ...] = (
    "pipeline.cli.model",
    "pipeline.cli.simulate",
    "bench.pipeline_bench",
    "pipeline.cli.sources",
    "pipeline.cli.outbox",
    "pipeline.cli.labels",
    "pipeline.cli.calibrate",
    "pipeline.cli.drift",
    "pipeline.cli.registry",
    "pipeline.cli.ohif",
    "bench.ingest_bench",
    "reliability.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-triage", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the whole system: Redis, worker, dashboard")
    run.add_argument("--port", type=int)
    ing = sub.add_parser("ingest", help="ingest files and folders of .dcm/.jpg/.jpeg/.png")
    ing.add_argument("paths", nargs="+")
    ing.add_argument("--wait", action="store_true", help="block until every study is final")
    ing.add_argument("--json", action="store_true")
    ing.add_argument("--lane", choices=("live", "bulk"), default="live")
    ing.add_argument("--timeout", type=float, default=3600.0)
    wl = sub.add_parser("worklist", help="studies by priority")
    wl.add_argument("--limit", type=int)
    wl.add_argument("--json", action="store_true")
    sub.add_parser(
        "worker",
        help="run the inference workers (Celery): a process per core on a CPU, one on a GPU",
    )
    serve = sub.add_parser("serve", help="run the dashboard under gunicorn")
    serve.add_argument("--port", type=int)
    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("db_cmd", choices=("upgrade",))
    users = sub.add_parser("users", help="accounts")
    users_sub = users.add_subparsers(dest="users_cmd", required=True)
    uc = users_sub.add_parser("create", help="add an account")
    uc.add_argument("username")
    uc.add_argument(
        "--role",
        choices=tuple(map(str, ROLES)),
        required=True,
        help="radiologist, admin (log in); feed (token may only send studies), "
        "monitor (token may only read /metrics)",
    )
    uc.add_argument("--password-stdin", action="store_true")
    ut = users_sub.add_parser("token", help="issue a new API token (printed once)")
    ut.add_argument("username")
    rq = sub.add_parser("requeue-stuck", help="re-send work stuck in queued/processing")
    rq.add_argument("--older-than", type=float, default=None, help="seconds (default setting)")
    rq.add_argument("--every", type=float, default=0, help="repeat every N seconds")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("CXR_LOG_LEVEL", "INFO"),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pydicom logs invalid header values verbatim; those can be patient names.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        settings = Settings.from_env(port=getattr(args, "port", None))
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args, settings))
        handlers = {
            "run": cmd_run,
            "ingest": cmd_ingest,
            "worklist": cmd_worklist,
            "users": cmd_users,
            "requeue-stuck": cmd_requeue,
        }
        if args.cmd in handlers:
            return handlers[args.cmd](args, settings)
        if args.cmd == "db":
            migrate.upgrade(settings.db_url)
            print("database is at the latest schema")
            return 0
        if args.cmd == "worker":
            return cmd_worker(settings)
        return cmd_exec(dashboard_command(settings), settings)
    except (ConfigError, UserError) as exc:
        print(f"cxr-triage: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
