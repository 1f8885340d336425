"""``cxr-triage serve``: the dashboard alone under gunicorn, against the running system."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli.common import exec_in_system
from pipeline.service.supervisor import dashboard_command
from pipeline.settings import Settings


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the dashboard under gunicorn")
    serve.add_argument("--port", type=int)
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    return exec_in_system(dashboard_command(settings), settings)
