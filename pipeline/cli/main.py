"""The ``cxr-triage`` command: one registry of subcommands.

Every subcommand lives in a module of its own (``pipeline/cli/<name>.py``, or a bench or
reliability module) that defines ``register(subparsers) -> None``; each parser it adds sets
``handler=fn`` with the one signature ``fn(args, settings) -> int`` (the exit status). The
modules are imported when the parser is built, so they import only what building it needs:
anything heavy (torch, the network) is imported inside the handler that uses it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.service.logs import configure as configure_logs
from pipeline.settings import ConfigError, Settings
from pipeline.users import UserError

COMMANDS: tuple[str, ...] = (
    # the system
    "pipeline.cli.run",
    "pipeline.cli.ingest",
    "pipeline.cli.worklist",
    "pipeline.cli.worker",
    "pipeline.cli.serve",
    "pipeline.cli.db",
    "pipeline.cli.users",
    "pipeline.cli.requeue",
    "pipeline.cli.sources",
    "pipeline.cli.outbox",
    "pipeline.cli.ohif",
    # the model and its monitoring
    "pipeline.cli.train",
    "pipeline.cli.evaluate",
    "pipeline.cli.registry",
    "pipeline.cli.labels",
    "pipeline.cli.calibrate",
    "pipeline.cli.drift",
    "pipeline.cli.simulate",
    # measurements
    "bench.pipeline_bench",
    "bench.ingest_bench",
    "reliability.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-triage", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logs()
    try:
        settings = Settings.from_env(port=getattr(args, "port", None))
        return int(args.handler(args, settings))
    except (ConfigError, UserError) as exc:
        print(f"cxr-triage: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
