"""The packages' import rules, checked in fresh interpreters.

- ``pipeline`` imports neither Flask nor Celery at import time (its modules are what the
  dashboard, the workers and the command line share);
- ``dashboard`` never imports ``worker`` and the dashboard process never imports torch;
- ``worker`` never imports ``dashboard``;
- no import opens a network connection (every socket ``connect`` is refused while importing).
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = r"""
import importlib, json, socket, sys
opened = []
def refuse(self, address, *a, **k):
    opened.append(repr(address))
    raise OSError("no connection may be opened at import time")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
for name in sys.argv[1:]:
    importlib.import_module(name)
tops = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"modules": tops, "opened": opened}))
"""


def _modules(package: str) -> list[str]:
    found = pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}.")
    return sorted(m.name for m in found)


def _import(names: list[str]) -> dict:
    env_clear = {"CXR_REDIS_URL": "redis://127.0.0.1:6399/0"}  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), **env_clear},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}


def test_pipeline_imports_neither_flask_nor_celery() -> None:
    found = _import(_modules("pipeline"))
    assert "flask" not in found["modules"] and "celery" not in found["modules"]
    assert "dashboard" not in found["modules"] and "worker" not in found["modules"]
    assert found["opened"] == []


def test_the_dashboard_never_imports_the_worker_nor_torch() -> None:
    found = _import(["dashboard", *_modules("dashboard")])
    assert "worker" not in found["modules"]
    assert "torch" not in found["modules"] and "celery" not in found["modules"]
    assert found["opened"] == []


@pytest.mark.parametrize("module", _modules("worker"))
def test_the_worker_never_imports_the_dashboard(module: str) -> None:
    found = _import([module])
    assert "dashboard" not in found["modules"] and "flask" not in found["modules"]
    assert found["opened"] == [], f"importing {module} opened {found['opened']}"


def test_the_celery_app_is_built_without_asking_redis(tmp_path: Path) -> None:
    (tmp_path / "runtime.json").write_text(json.dumps({"redis_url": "redis://127.0.0.1:6399/0"}))
    env = {**_env(), "CXR_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "worker.celery_app"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["opened"] == []
