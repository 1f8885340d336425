"""How long OHIF takes to show a study: from navigating to its URL to the film in the viewport.

``python -m bench.viewer_bench [--json] [--runs N] [--waterfall] [--cpu-rendering]
[--compare-identity] [--network MBIT[/MS]]`` sets up
a site of its own (a temporary data dir, an embedded Redis, SQLite, the shipped weights, the
OHIF build ``cxr-triage ohif install`` made), ingests the NEMA WG04 chest CR (1955 x 1841,
15-bit, 7.2 MB uncompressed), the same film as JPEG 2000 in a study of its own (its pixel data
byte for byte, new UIDs) and a 1024-px baseline JPEG study made from it, scores them, and
serves the dashboard as ``cxr-triage run`` does (gunicorn, one worker, four threads). Then, for
each study, N times: a fresh browser context (an empty HTTP cache; the browser process, with
its GPU process, is shared) logs in and opens the study (cold), goes to the worklist, and
opens it again (warm: bundles, metadata and frames from its cache where their headers allow).

The time is to the first rendered image as ``bench.viewer_site`` defines it (the canvas shows a
film, not a black or uniform frame), from the navigation's start. The server makes a study's AI
result objects (CAM captures, SR) on its first DICOMweb look; that is timed on its own
(``first_look_ms``) before the opens. Where the time goes (``bench.viewer_timing``): milestones
from the browser's network timing, the page's main-thread time, the CPU the browser and the
server used. ``--cpu-rendering`` opens with OHIF's ``viewportRendering=cpu`` (no WebGL). ``--compare-identity``
also opens the CR in contexts that ask for uncompressed responses (the build is sent gzipped to
a browser that accepts it) and prints the ratio of the two medians, measured in the same run;
``--network`` has Chromium emulate a department's network (rate and latency) instead of the
loopback, where compression saves transfer time rather than costing it.
Logs go to stderr; ``--json`` prints exactly one JSON line on stdout. No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import viewer_site as site
from bench.viewer_measure import IDENTITY, gunicorn, measure
from bench.viewer_timing import PHASES, waterfall

GOAL_MS = 1500.0
CASES = ("cr", "cr_j2k", "jpeg")
LABELS = {
    "cr": "CR RG1 (1955x1841 15-bit, 7.2 MB)",
    "cr_j2k": "CR RG1 as JPEG 2000 (4.3 MB)",
    "jpeg": "JPEG study (1024 px baseline)",
    "cr_identity": "CR RG1, uncompressed responses",
}


class Unavailable(RuntimeError):
    """What the bench needs is not on this machine (Chromium, the OHIF build, the films)."""


def twin_study(source: Path, dest: Path) -> Path:
    """The file with new study, series and SOP UIDs; its pixel data untouched."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = "BENCH-J2K"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def run(
    runs: int = 5,
    cases: tuple[str, ...] = CASES,
    weights: Path | None = None,
    cpu: bool = False,
    build: Path | None = None,
    network: tuple[float, float] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Set up the site on embedded defaults, measure, and return the --json document."""
    from pipeline.classifier.weights import ensure_weights
    from pipeline.queue.dispatch import redis_client
    from pipeline.service.redis_server import EmbeddedRedis
    from pipeline.settings import Settings
    from pipeline.viewer import ohif

    why = site.available()
    build = build or ohif.viewer_dir(Settings.from_env())
    if why is None and not ohif.installed(build):
        why = f"OHIF {ohif.VERSION} is not installed at {build}: run `cxr-triage ohif install`"
    if why:
        raise Unavailable(why)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cxr-viewer-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "redis").mkdir()
        redis = EmbeddedRedis(workdir / "redis").start()
        try:
            settings = Settings(
                data_dir=workdir / "data",
                redis_url=redis.url,
                database_url=f"sqlite:///{workdir / 'site.db'}",
                ohif_dir=str(build),
                torch_threads=1,
                weights=weights,
            )
            settings = settings.with_(weights=ensure_weights(settings))
            paths = site.films(workdir / "films", j2k=False)
            paths["cr_j2k"] = twin_study(site.RG1 / "RG1_J2KR.dcm", workdir / "films" / "j2k.dcm")
            client = redis_client(redis.url)
            films = {c: paths[c] for c in dict.fromkeys(c.removesuffix(IDENTITY) for c in cases)}
            built = site.populate(settings, films, client)
            client.close()
            with gunicorn(settings, workdir) as (base, pid):
                summary, last = measure(base, built.studies, runs, cases, pid, cpu, network)
        finally:
            redis.stop()
    browser = summary.pop("_browser")
    doc = {
        "runs": runs,
        "browser": f"headless Chromium {browser}, WebGL 2 on SwiftShader (no GPU)",
        "rendering": "cornerstone CPU (viewportRendering=cpu)" if cpu else "cornerstone WebGL",
        "cores": os.cpu_count(),
        "server": "gunicorn, 1 worker, 4 threads, loopback",
        "network": (
            f"emulated by Chromium: {network[0]:g} Mbit/s, {network[1]:g} ms latency"
            if network
            else "loopback, not emulated"
        ),
        "first_image": "ms from navigation start to the first cornerstone render after which "
        f"the viewport canvas (scaled to 64x64) has a grey SD above {site.BLANK_SD:g}",
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "goal_cr_ms": GOAL_MS,
        "studies": summary,
    }
    if "cr" in summary:
        doc["cr_cold_under_goal"] = summary["cr"]["cold_ms"]["median"] < GOAL_MS
        doc["cr_warm_under_goal"] = summary["cr"]["warm_ms"]["median"] < GOAL_MS
    ratios = {}  # each case opened both ways in this run, side by side
    for case in [c for c in summary if c + IDENTITY in summary]:
        plain = summary[case + IDENTITY]
        ratios[case] = {
            state: round(summary[case][f"{state}_ms"]["median"] / plain[f"{state}_ms"]["median"], 3)
            for state in ("cold", "warm")
        }
    if ratios:
        doc["compressed_over_identity"] = ratios
    return doc, last


def table(doc: dict[str, Any]) -> str:
    """The summary as a small table: medians (min-max), milestones, main thread and CPU."""
    head = (
        f"{'study':34} {'':4} {'first image ms':>19} "
        + " ".join(f"{p:>8}" for p in PHASES[:-1])
        + f" {'OHIF':>6} {'main':>6} {'cpu ch':>6} {'cpu sv':>6}"
    )
    lines = [head]
    for case, row in doc["studies"].items():
        for state in ("cold", "warm"):
            t, ph = row[f"{state}_ms"], row[f"{state}_phases_ms"]
            ohif_t = row.get(f"{state}_ohif_study_to_first_image_ms", {}).get("median")
            cells = [f"{ph[p]:>8.0f}" if ph[p] is not None else f"{'-':>8}" for p in PHASES[:-1]]
            extra = [
                ohif_t,
                row[f"{state}_main_thread_ms"]["tasks"],
                row[f"{state}_cpu_ms"]["browser"],
                row[f"{state}_cpu_ms"]["server"],
            ]
            lines.append(
                f"{LABELS.get(case, case):34} {state:4} "
                + f"{t['median']:>6.0f} ({t['min']:.0f}-{t['max']:.0f})".ljust(19)
                + " "
                + " ".join(cells)
                + " "
                + " ".join(f"{v:>6.0f}" if v is not None else f"{'-':>6}" for v in extra)
            )
        lines.append(
            f"{'':34} the AI result objects made on first look: "
            f"{row['first_look_ms']:.0f} ms (server, once per study)"
        )
    lines += [
        "milestones: ms from navigation start (page: index.html; boot: the app's files before "
        "its first query; qido, metadata, frames: the last received; frame_asked: the first "
        "frame request sent). OHIF: its own studyToFirstImage timer; main: the page's "
        "main-thread task time; cpu ch / sv: CPU ms of Chromium's processes / the server's.",
        f"goal for the CR: {doc['goal_cr_ms']:.0f} ms; medians of {doc['runs']} runs; "
        f"{doc['browser']}; {doc['rendering']}; {doc['cores']} cores; {doc['server']}; "
        f"network {doc['network']}; "
        f"load average {doc['load_average_1m'][0]} before, {doc['load_average_1m'][1]} after",
    ]
    for case, ratio in doc.get("compressed_over_identity", {}).items():
        lines.append(
            f"{LABELS.get(case, case)}, compressed responses / uncompressed, same run: "
            f"cold {ratio['cold']:.2f}x, warm {ratio['warm']:.2f}x"
        )
    return "\n".join(lines)


def parse_network(text: str | None) -> tuple[float, float] | None:
    """``MBIT[/MS]`` as (Mbit/s, latency ms); None for no emulation."""
    if not text:
        return None
    mbit, _, ms = text.partition("/")
    try:
        rate, latency = float(mbit), float(ms or 0)
    except ValueError:
        raise SystemExit(f"--network {text!r}: expected MBIT[/MS], e.g. 100/2") from None
    if rate <= 0 or latency < 0:
        raise SystemExit(f"--network {text!r}: the rate must be positive, the latency not negative")
    return rate, latency


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.viewer_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("--runs", type=int, default=5, help="cold+warm opens per study")
    parser.add_argument(
        "--cpu-rendering",
        action="store_true",
        help="open with OHIF's viewportRendering=cpu (no WebGL contexts)",
    )
    parser.add_argument(
        "--compare-identity",
        action="store_true",
        help="also open the CR asking for uncompressed responses, and print the ratio of the two",
    )
    parser.add_argument(
        "--network",
        metavar="MBIT[/MS]",
        help="have Chromium emulate this network for the opens, e.g. 100/2 "
        "(100 Mbit/s, 2 ms latency); default: the loopback as it is",
    )
    parser.add_argument(
        "--waterfall",
        action="store_true",
        help="print the last cold and warm CR opens' requests to stderr",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        cases = CASES + (("cr" + IDENTITY,) if args.compare_identity else ())
        doc, last = run(
            max(1, args.runs),
            cases=cases,
            cpu=args.cpu_rendering,
            network=parse_network(args.network),
        )
    except Unavailable as exc:
        print(f"viewer bench: {exc}", file=sys.stderr)
        return 2
    if args.waterfall:
        for state, opened in last.items():
            print(f"--- {LABELS[CASES[0]]}, {state}: requests (start, end ms)", file=sys.stderr)
            print(waterfall(opened), file=sys.stderr)
    print(json.dumps(doc) if args.json else table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
