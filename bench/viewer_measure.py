"""The viewer bench's measurement: the dashboard served as ``run`` serves it, studies opened."""

from __future__ import annotations

import logging
import os
import socket
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import viewer_site as site
from bench.viewer_timing import PHASES, open_study, phases

log = logging.getLogger("bench.viewer_bench")
IDENTITY = "_identity"  # a case opened asking for uncompressed responses


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def gunicorn(settings: Any, workdir: Path):  # type: ignore[no-untyped-def]
    """The dashboard as ``cxr-triage run`` starts it, on a free loopback port."""
    import urllib.request

    from pipeline.service.supervisor import dashboard_command

    settings = settings.with_(port=_free_port(), host="127.0.0.1")
    out = open(workdir / "dashboard.log", "wb")
    env = {**os.environ, **settings.as_env()}
    proc = subprocess.Popen(
        dashboard_command(settings),
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/login", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the dashboard did not start:\n"
                        + (workdir / "dashboard.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        out.close()


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def _median_phases(opens: list[dict[str, Any]]) -> dict[str, float | None]:
    each = [phases(o["requests"], o["first_image_ms"]) for o in opens]
    out: dict[str, float | None] = {}
    for kind in PHASES:
        values = [v for p in each if (v := p[kind]) is not None]
        out[kind] = round(statistics.median(values), 1) if values else None
    return out


def measure(
    base: str,
    studies: dict[str, str],
    runs: int,
    cases: tuple[str, ...],
    server_pid: int | None = None,
    cpu: bool = False,
    network: tuple[float, float] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every case opened cold then warm, runs times; the summary and the first case's last
    cold and warm opens."""
    opens: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"cold": [], "warm": []} for c in cases}
    first_look: dict[str, float] = {}
    with site.browser() as chromium:
        page = site.logged_in(chromium, base)
        for case in [c for c in cases if not c.endswith(IDENTITY)]:  # the server's first look
            start = time.perf_counter()
            response = page.request.get(f"{base}/dicomweb/studies/{studies[case]}/series")
            first_look[case] = round((time.perf_counter() - start) * 1000, 1)
            if response.status != 200:
                raise RuntimeError(f"QIDO for {case}: HTTP {response.status}")
        page.context.close()
        version = chromium.version
        for run in range(runs):
            for case in cases:
                page = site.logged_in(chromium, base, identity=case.endswith(IDENTITY))
                url = site.viewer_url(base, studies[case.removesuffix(IDENTITY)], cpu)
                opens[case]["cold"].append(open_study(page, url, server_pid, network))
                page.goto(base + "/")
                opens[case]["warm"].append(open_study(page, url, server_pid, network))
                page.context.close()
                log.info(
                    "run %d %s: cold %.0f ms, warm %.0f ms",
                    run + 1,
                    case,
                    opens[case]["cold"][-1]["first_image_ms"],
                    opens[case]["warm"][-1]["first_image_ms"],
                )
    summary: dict[str, Any] = {}
    for case in cases:
        row: dict[str, Any] = {"first_look_ms": first_look[case.removesuffix(IDENTITY)]}
        for state in ("cold", "warm"):
            got = opens[case][state]
            row[f"{state}_ms"] = _stats([o["first_image_ms"] for o in got])
            row[f"{state}_phases_ms"] = _median_phases(got)
            study_to_first = [
                o["timers"]["studyToFirstImage"] for o in got if "studyToFirstImage" in o["timers"]
            ]
            if study_to_first:
                row[f"{state}_ohif_study_to_first_image_ms"] = _stats(study_to_first)
            row[f"{state}_seen_by_poll"] = sum(o["seen_by"] == "poll" for o in got)
            for key in ("main_thread_ms", "cpu_ms"):
                row[f"{state}_{key}"] = {
                    k: round(statistics.median(o[key][k] for o in got), 1) for k in got[0][key]
                }
        summary[case] = row
    summary["_browser"] = version
    last = {state: opens[cases[0]][state][-1] for state in ("cold", "warm")}
    return summary, last
