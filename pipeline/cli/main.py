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

# Each subcommand, and the module that registers it. Running one imports only its module;
# `--help` (or a word that is no command) imports them all to list them.
COMMANDS: dict[str, str] = {
    # the system
    "run": "pipeline.cli.run",
    "ingest": "pipeline.cli.ingest",
    "worklist": "pipeline.cli.worklist",
    "worker": "pipeline.cli.worker",
    "serve": "pipeline.cli.serve",
    "db": "pipeline.cli.db",
    "users": "pipeline.cli.users",
    "requeue-stuck": "pipeline.cli.requeue",
    "watch": "pipeline.cli.sources",
    "dicom-listen": "pipeline.cli.sources",
    "pull": "pipeline.cli.sources",
    "send-results": "pipeline.cli.outbox",
    "ohif": "pipeline.cli.ohif",
    # the model and its monitoring
    "train": "pipeline.cli.train",
    "loso": "pipeline.cli.train",
    "evaluate": "pipeline.cli.evaluate",
    "models": "pipeline.cli.registry",
    "labels": "pipeline.cli.labels",
    "calibrate": "pipeline.cli.calibrate",
    "drift-reference": "pipeline.cli.drift",
    "simulate": "pipeline.cli.simulate",
    # measurements
    "bench": "bench.pipeline_bench",
    "bench-ingest": "bench.ingest_bench",
    "reliability": "reliability.cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``command`` alone when it is one."""
    parser = argparse.ArgumentParser(prog="cxr-triage", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    wanted = [COMMANDS[command]] if command in COMMANDS else list(COMMANDS.values())
    for module in dict.fromkeys(wanted):  # a module that registers several commands, once
        importlib.import_module(module).register(sub)
    return parser


def _command_in(argv: list[str]) -> str | None:
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_in(argv)).parse_args(argv)
    configure_logs()
    try:
        settings = Settings.from_env(port=getattr(args, "port", None))
        return int(args.handler(args, settings))
    except (ConfigError, UserError) as exc:
        print(f"cxr-triage: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
