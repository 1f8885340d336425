"""``cxr-triage requeue-stuck``: one recovery pass by hand (or every N seconds)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from pipeline.cli.common import require_redis
from pipeline.service.recovery import reconcile_once
from pipeline.settings import Settings


def register(sub: Any) -> None:
    rq = sub.add_parser("requeue-stuck", help="re-send work stuck in queued/processing")
    rq.add_argument("--older-than", type=float, default=None, help="seconds (default setting)")
    rq.add_argument("--every", type=float, default=0, help="repeat every N seconds")
    rq.set_defaults(handler=cmd_requeue)


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    redis_url = require_redis(settings)
    while True:
        print(json.dumps(reconcile_once(settings, redis_url, args.older_than)), flush=True)
        if not args.every:
            return 0
        time.sleep(args.every)
