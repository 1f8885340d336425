"""``cxr-triage worker``: this machine's inference workers (Celery), against the running
system's Redis: a process per core on a CPU, one on a GPU."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pipeline.cli.common import require_redis
from pipeline.service.recovery import watch_workers
from pipeline.service.supervisor import Supervisor, child_env, worker_children
from pipeline.settings import Settings


def register(sub: Any) -> None:
    worker = sub.add_parser(
        "worker",
        help="run the inference workers (Celery): a process per core on a CPU, one on a GPU",
    )
    worker.set_defaults(handler=cmd_worker)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """The inference workers of this machine's layout; one process replaces this one."""
    redis_url = require_redis(settings)
    children = worker_children(settings, child_env(settings, redis_url))
    if len(children) == 1:
        _, command, env = children[0]
        os.execvpe(command[0], command, env)
    sup = Supervisor()
    for name, command, env in children:
        sup.add(name, command, env)
    watch_workers(sup, settings, redis_url)
    sup.run()
    return 0
