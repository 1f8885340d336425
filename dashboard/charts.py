"""Server-side SVG charts: no chart library, no script, nothing fetched from elsewhere."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 180
LEFT, BOTTOM, TOP = 40, 22, 10


def _nice_ceiling(n: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least n (a readable axis top)."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= n:
                return step * m
        step *= 10


def throughput_svg(per_minute: list[dict[str, Any]]) -> Markup:
    """Images finished per minute over the last hour as stacked bars (done, failed)."""
    top = _nice_ceiling(max([m["done"] + m["failed"] for m in per_minute] + [1]))
    plot_w, plot_h = WIDTH - LEFT - 5, HEIGHT - BOTTOM - TOP
    slot = plot_w / max(1, len(per_minute))
    parts = [
        f'<svg id="throughput-chart" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        'role="img" aria-label="Images finished per minute, last 60 minutes" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - 5}" y2="{TOP + plot_h}" class="axis"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" class="tick">{top}</text>',
        f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end" class="tick">0</text>',
    ]
    for i, m in enumerate(per_minute):
        x = LEFT + i * slot + 1
        done_h = plot_h * m["done"] / top
        fail_h = plot_h * m["failed"] / top
        label = escape(f"{m['minute']}: {m['done']} done, {m['failed']} failed")
        parts.append(
            f'<g class="bar" data-done="{m["done"]}" data-failed="{m["failed"]}"><title>{label}'
            f'</title><rect class="done" x="{x:.1f}" y="{TOP + plot_h - done_h:.1f}" '
            f'width="{slot - 2:.1f}" height="{done_h:.1f}"/>'
            f'<rect class="failed" x="{x:.1f}" y="{TOP + plot_h - done_h - fail_h:.1f}" '
            f'width="{slot - 2:.1f}" height="{fail_h:.1f}"/></g>'
        )
    for minutes_ago, anchor in ((60, "start"), (30, "middle"), (0, "end")):
        x = LEFT + plot_w * (1 - minutes_ago / 60)
        text = "now" if minutes_ago == 0 else f"−{minutes_ago} min"
        parts.append(
            f'<text x="{x:.0f}" y="{HEIGHT - 5}" text-anchor="{anchor}" class="tick">{text}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


CAL_SIZE, CAL_PAD = 300, 36


def reliability_svg(calibration: dict[str, Any], element_id: str = "calibration-chart") -> Markup:
    """A reliability diagram: per score bin, the observed share abnormal (with its 95 %
    interval) against the bin's mean score; the diagonal is perfect calibration."""
    plot = CAL_SIZE - 2 * CAL_PAD

    def x(v: float) -> float:
        return CAL_PAD + plot * v

    def y(v: float) -> float:
        return CAL_PAD + plot * (1 - v)

    parts = [
        f'<svg id="{escape(element_id)}" class="chart calibration" '
        f'viewBox="0 0 {CAL_SIZE} {CAL_SIZE}" role="img" aria-label="Reliability diagram: '
        'observed share abnormal against the model score" xmlns="http://www.w3.org/2000/svg">',
        f'<rect class="frame" x="{CAL_PAD}" y="{CAL_PAD}" width="{plot}" height="{plot}"/>',
        f'<line class="diagonal" x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}"/>',
    ]
    for v in (0.0, 0.5, 1.0):
        parts.append(
            f'<text x="{x(v):.0f}" y="{CAL_SIZE - CAL_PAD + 14}" text-anchor="middle" '
            f'class="tick">{v:.1f}</text>'
        )
        parts.append(
            f'<text x="{CAL_PAD - 6}" y="{y(v) + 4:.0f}" text-anchor="end" '
            f'class="tick">{v:.1f}</text>'
        )
    parts.append(
        f'<text x="{CAL_SIZE / 2:.0f}" y="{CAL_SIZE - 6}" text-anchor="middle" '
        'class="tick">model score (bin mean)</text>'
    )
    parts.append(
        f'<text x="12" y="{CAL_SIZE / 2:.0f}" text-anchor="middle" class="tick" '
        f'transform="rotate(-90 12 {CAL_SIZE / 2:.0f})">observed abnormal</text>'
    )
    for b in calibration["bins"]:
        if not b["n"]:
            continue
        cx, cy = x(b["mean_score"]), y(b["observed"])
        lo, hi = b["ci"]
        label = escape(
            f"score {b['lo']:.1f}-{b['hi']:.1f}: {b['n']} studies, mean score "
            f"{b['mean_score']:.2f}, observed {b['observed']:.2f}"
        )
        parts.append(
            f'<g class="bin" data-n="{b["n"]}" data-observed="{b["observed"]:.4f}" '
            f'data-mean-score="{b["mean_score"]:.4f}"><title>{label}</title>'
            f'<line class="whisker" x1="{cx:.1f}" y1="{y(lo):.1f}" x2="{cx:.1f}" y2="{y(hi):.1f}"/>'
            f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="4"/></g>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
