"""The start-up bench prints one JSON line with a time for every case (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_startup_bench_prints_one_json_line_with_every_case() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.startup_bench", "--runs", "1", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["runs"] == 1
    assert set(doc["seconds"]) == {
        "python -c pass",
        'python -c "import pipeline.cli.main"',
        "cxr-triage --help",
        "cxr-triage worklist --json",
        "the dashboard, until its app is built",
    }
    assert all(isinstance(v, float) and v > 0 for v in doc["seconds"].values())
