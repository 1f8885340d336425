"""The production compose file parses and has the services the README promises."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO


def test_compose_file_validates() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    env = {**os.environ, "POSTGRES_PASSWORD": "pw", "CXR_SECRET_KEY": "secret"}
    proc = subprocess.run(
        ["docker-compose", "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    services = config["services"]
    assert {"redis", "postgres", "migrate", "worker", "dashboard", "reconciler"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["dashboard"]["command"] == ["cxr-triage", "serve"]
    assert services["dicom-listen"]["command"][:2] == ["cxr-triage", "dicom-listen"]
    assert services["dicom-listen"]["ports"][0]["target"] == 11112
    assert services["watch"]["command"] == ["cxr-triage", "watch", "/incoming"]
    assert services["send-results"]["command"] == ["cxr-triage", "send-results"]
    assert services["orthanc"]["profiles"] == ["demo"]
    assert services["orthanc"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    # Without the secrets the file refuses to render, so production cannot start with defaults.
    bare = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "CXR_SECRET_KEY")}
    refused = subprocess.run(
        ["docker-compose", "config", "-q"],
        cwd=REPO,
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
