"""The reliability table, as text (README-ready Markdown) or JSON."""

from __future__ import annotations

import json

from reliability.metrics import Row

COLUMNS = (
    "scenario",
    "profile",
    "sent",
    "done",
    "rejected",
    "lost",
    "duplicated",
    "recomputed",
    "recover s",
    "ok",
    "note",
)


def _cells(row: Row) -> list[str]:
    recover = "-" if row.recover_s is None else f"{row.recover_s:.1f}"
    note = "; ".join([row.note] + row.failures if row.note else row.failures)
    return [
        row.scenario,
        row.profile,
        str(row.sent),
        str(row.done),
        str(row.rejected),
        str(row.lost),
        str(row.duplicated),
        str(row.recomputed),
        recover,
        "yes" if row.ok else "**NO**",
        note,
    ]


def markdown(rows: list[Row]) -> str:
    """A Markdown table, numbers right-aligned."""
    align = ["---", "---"] + ["---:"] * 7 + ["---", "---"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def as_json(rows: list[Row]) -> str:
    """One line: ``{"ok": bool, "rows": [...]}``."""
    return json.dumps({"ok": all(r.ok for r in rows), "rows": [r.as_dict() for r in rows]})
