"""How long the commands that do not run the network take to start, as a user meets them: each
is a fresh interpreter (median of N runs) on a data directory of its own, with the shipped
settings. ``python -m bench.startup_bench [--runs 5] [--json]``.

The reference is ``python -c pass`` in the same run, so the figures can be read on any CPU as
"so much more than an empty interpreter"."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    'python -c "import pipeline.cli.main"': [sys.executable, "-c", "import pipeline.cli.main"],
    "cxr-triage --help": [sys.executable, "-m", "pipeline.cli", "--help"],
    "cxr-triage worklist --json": [sys.executable, "-m", "pipeline.cli", "worklist", "--json"],
}
# The dashboard is a server: what counts is the time until it can answer (its app built),
# not its exit, so the child says "ready" and the clock stops on that line.
DASHBOARD = "the dashboard, until its app is built"
DASHBOARD_CODE = "from dashboard import create_app\ncreate_app()\nprint('ready', flush=True)\n"


def _time(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, timeout=120)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{command}: {proc.stderr.decode(errors='replace')[-1500:]}")
    return seconds


def _time_until_ready(env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", DASHBOARD_CODE],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    seconds = time.perf_counter() - start
    proc.wait(timeout=60)
    if line.strip() != b"ready":
        raise RuntimeError(f"dashboard: {proc.stderr.read().decode(errors='replace')[-1500:]}")
    return seconds


def measure(runs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cxr-startup-") as data:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env["CXR_DATA_DIR"] = data
        env["CXR_LOG_LEVEL"] = "WARNING"
        _time(CASES["cxr-triage worklist --json"], env)  # creates the database once, untimed
        result = {
            name: round(statistics.median(_time(cmd, env) for _ in range(runs)), 3)
            for name, cmd in CASES.items()
        }
        result[DASHBOARD] = round(statistics.median(_time_until_ready(env) for _ in range(runs)), 3)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.runs)
    if args.json:
        print(json.dumps({"runs": args.runs, "seconds": result}))
        return 0
    base = result["python -c pass"]
    for name, seconds in result.items():
        print(f"{name:40s} {seconds:6.3f} s   (+{seconds - base:.3f} s over an empty interpreter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
