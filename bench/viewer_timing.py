"""One open of a study in OHIF, timed: its requests, milestones, main thread and CPU.

``open_study`` navigates a logged-in page to a viewer URL and waits for the first rendered
image (``bench.viewer_site.WATCH``). Meanwhile it keeps every request the context finished
(Playwright's network timing: start and end, ms from the navigation's start), OHIF's own
console timers (``studyToFirstImage``, ``scriptToView``), the page's main-thread time from
Chromium's Performance metrics, and the CPU time the browser's processes and the server's
used (psutil, over this process's children). ``phases`` turns the requests into milestones.
"""

from __future__ import annotations

from typing import Any

from bench import viewer_site as site

PHASES = ("page", "boot", "qido", "metadata", "frame_asked", "frames", "first_image")


def category(url: str) -> str:
    """What a request was for: the page, the app's files, QIDO, metadata, frames, other."""
    path = url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
    if path.startswith("ohif/viewer"):
        return "page"
    if path.startswith("ohif/"):
        return "app"
    if path.startswith("dicomweb/"):
        if "/frames/" in path:
            return "frames"
        if path.endswith("/metadata"):
            return "metadata"
        if "thumbnail" in path or "/rendered" in path or "/bulk/" in path:
            return "other"
        return "qido"
    return "other"


def phases(requests: list[dict[str, Any]], first_image_ms: float) -> dict[str, float | None]:
    """The milestones of one open, ms from the navigation's start (None: no such request).

    page: index.html received; boot: the app's last file received before its first QIDO
    query was sent (the app has started); qido, metadata: the last of each received;
    frame_asked: the first frame request sent (the viewport is ready for pixels); frames: the
    last frame received; first_image: the film drawn. Requests sent after it do not count.
    """
    before = [r for r in requests if r["start_ms"] <= first_image_ms]

    def last_end(kind: str, until: float = first_image_ms) -> float | None:
        ends = [r["end_ms"] for r in before if r["kind"] == kind and r["start_ms"] <= until]
        return round(max(ends), 1) if ends else None

    qido_sent = [r["start_ms"] for r in before if r["kind"] == "qido"]
    frames_sent = [r["start_ms"] for r in before if r["kind"] == "frames"]
    return {
        "page": last_end("page"),
        "boot": last_end("app", min(qido_sent)) if qido_sent else None,
        "qido": last_end("qido"),
        "metadata": last_end("metadata"),
        "frame_asked": round(min(frames_sent), 1) if frames_sent else None,
        "frames": last_end("frames"),
        "first_image": round(first_image_ms, 1),
    }


def _cpu_ms(server_pid: int | None) -> dict[str, dict[int, float]]:
    """CPU time so far (ms) of this process's children: the server's tree and the browser's."""
    import psutil

    server: set[int] = set()
    if server_pid is not None:
        try:
            root = psutil.Process(server_pid)
            server = {server_pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    out: dict[str, dict[int, float]] = {"server": {}, "browser": {}}
    for proc in psutil.Process().children(recursive=True):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        side = "server" if proc.pid in server else "browser"
        out[side][proc.pid] = (times.user + times.system) * 1000
    return out


def _cpu_used(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    return {
        side: round(sum(v - before[side].get(pid, 0.0) for pid, v in after[side].items()), 1)
        for side in after
    }


def open_study(
    page: Any, url: str, server_pid: int | None = None, network: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Navigate to the study; the first image's time, the requests, OHIF's own timers, the
    main thread's busy time (Chromium's Performance metrics) and the CPU each side used.

    ``network``: (Mbit/s, latency ms) that Chromium emulates for the page's requests (a
    department's network rather than the loopback); None: no emulation."""
    requests: list[Any] = []
    timers: dict[str, float] = {}

    def on_request(request: Any) -> None:
        requests.append(request)

    def on_console(msg: Any) -> None:
        if msg.type == "timeEnd" and ": " in msg.text:
            name, value = msg.text.rsplit(": ", 1)
            timers[name] = float(value.split()[0])

    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    if network is not None:
        rate = network[0] * 1e6 / 8  # bytes per second
        cdp.send("Network.enable")
        cdp.send(
            "Network.emulateNetworkConditions",
            {
                "offline": False,
                "latency": network[1],
                "downloadThroughput": rate,
                "uploadThroughput": rate,
            },
        )
    page.context.on("requestfinished", on_request)
    page.on("console", on_console)
    try:
        cpu = _cpu_ms(server_pid)
        page.goto(url, wait_until="commit")
        first = site.wait_first_image(page)
        cpu_used = _cpu_used(cpu, _cpu_ms(server_pid))
        # Chromium starts these over for each document: they cover this one from its start.
        busy = {k: round(v, 1) for k, v in _busy(cdp).items()}
        page.wait_for_timeout(300)  # the events of requests already done
        origin = float(page.evaluate("performance.timeOrigin"))
        seen_by = str(page.evaluate("window.__firstImageBy"))
    finally:
        cdp.detach()
        page.context.remove_listener("requestfinished", on_request)
        page.remove_listener("console", on_console)
    rows = []
    for r in requests:
        timing = r.timing
        if timing["startTime"] <= 0:
            continue
        start = timing["startTime"] - origin
        rows.append(
            {
                "url": r.url,
                "kind": category(r.url),
                "start_ms": round(start, 1),
                "end_ms": round(start + max(timing["responseEnd"], 0), 1),
            }
        )
    rows.sort(key=lambda r: r["start_ms"])
    return {
        "first_image_ms": first,
        "seen_by": seen_by,
        "requests": rows,
        "timers": timers,
        "main_thread_ms": busy,
        "cpu_ms": cpu_used,
    }


def _busy(cdp: Any) -> dict[str, float]:
    """The document's main thread so far (ms): all tasks, scripts, layout, style."""
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    names = {
        "TaskDuration": "tasks",
        "ScriptDuration": "script",
        "LayoutDuration": "layout",
        "RecalcStyleDuration": "style",
    }
    return {label: metrics.get(name, 0.0) * 1000 for name, label in names.items()}


def waterfall(opened: dict[str, Any]) -> str:
    """One open's requests: start and end (ms from navigation start), kind, path."""
    rows = [
        f"{r['start_ms']:8.0f} {r['end_ms']:8.0f}  {r['kind']:9} {r['url'].split('/', 3)[-1][:110]}"
        for r in opened["requests"]
    ]
    return "\n".join([*rows, f"first image at {opened['first_image_ms']:.0f} ms"])
