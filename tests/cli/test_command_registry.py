"""The command registry: every subcommand is named once, by the module that registers it, and
running one imports only that module."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

from pipeline.cli.main import COMMANDS, build_parser
from tests.conftest import REPO


def _registered_by(module: str) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    importlib.import_module(module).register(sub)
    return set(sub.choices)


def test_each_module_registers_exactly_the_commands_the_registry_names_for_it() -> None:
    for module in set(COMMANDS.values()):
        named = {name for name, owner in COMMANDS.items() if owner == module}
        assert _registered_by(module) == named, module


def test_every_command_has_a_handler_with_the_one_signature() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for name, command in sub.choices.items():
        handler = command.get_default("handler")
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if handler is None:  # handlers on the nested sub-commands (e.g. `ohif install`)
            assert nested, name
            handlers = [p.get_default("handler") for p in nested[0].choices.values()]
            assert all(callable(h) for h in handlers), name
        else:
            assert callable(handler), name
            assert list(handler.__code__.co_varnames[:2]) == ["args", "settings"], name


def test_running_one_command_imports_only_its_module() -> None:
    code = (
        "import json, sys\nfrom pipeline.cli.main import build_parser\n"
        "build_parser('worklist')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('pipeline.cli.', 'bench', 'reliability')))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == ["pipeline.cli.main", "pipeline.cli.worklist"]
