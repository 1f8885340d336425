"""``cxr-triage calibrate [--since DATE] [--target-sensitivity 0.95] [--json]``.

Prints the proposal of ``pipeline.monitoring.calibrate`` (thresholds and a temperature scale from the
site's reviewed studies, what they would give, how many waiting studies would change class).
It changes nothing: an admin applies or rejects it on the console's policy page. Exit 0 with a
proposal, 2 when there is too little ground truth or the options are wrong. ``--json`` prints
exactly one line on stdout in every case.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline import migrate
from pipeline.db import dispose_engines, session_factory
from pipeline.settings import Settings

DEFAULT_DAYS = 90


def _fail(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        print(f"cxr-triage calibrate: {message}", file=sys.stderr)
    return 2


def _since(text: str | None) -> datetime:
    if not text:
        return datetime.now(UTC) - timedelta(days=DEFAULT_DAYS)
    try:
        day = datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"--since {text!r} is not a date (YYYY-MM-DD)") from None
    return day.replace(tzinfo=UTC)


def _pct(rate: dict[str, Any]) -> str:
    if rate.get("value") is None:
        return "-"
    lo, hi = rate["ci"]
    return f"{100 * rate['value']:.1f} % ({100 * lo:.1f}-{100 * hi:.1f})"


def cmd_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.classifier.weights import describe_weights
    from pipeline.monitoring.calibrate import CalibrationError, propose

    try:
        since = _since(args.since)
    except ValueError as exc:
        return _fail(args, str(exc))
    model = describe_weights(settings)
    migrate.upgrade(settings.db_url)
    try:
        with session_factory(settings)() as session:
            doc = propose(
                session,
                since,
                datetime.now(UTC),
                model.get("thresholds") or {},
                args.target_sensitivity,
            )
    except CalibrationError as exc:
        return _fail(args, str(exc))
    finally:
        dispose_engines()
    if args.json:
        print(json.dumps({"ok": True, **doc}))
        return 0
    print(
        f"{doc['reviewed']} reviewed studies ({doc['abnormal']} abnormal, {doc['normal']} normal)"
        f" since {since:%Y-%m-%d}; AUC {doc['auc'].get('auc')}"
    )
    print(
        f"temperature scale {doc['temperature_scale']} (in force: "
        f"{doc['current']['temperature_scale']}, policy version "
        f"{doc['current']['policy_version']})"
    )
    print(f"{'threshold':<10} {'proposed':>9} {'sensitivity':>24} {'specificity':>24}   in force")
    for name in ("routine", "urgent", "critical"):
        e, c = doc["expected"][name], doc["current"][name]
        print(
            f"{name:<10} {e['threshold']:>9.4f} {_pct(e['sensitivity']):>24} "
            f"{_pct(e['specificity']):>24}   {c['threshold']:.4f}: sensitivity "
            f"{_pct(c['sensitivity'])}, specificity {_pct(c['specificity'])}"
        )
    print(
        f"{doc['waiting_changed']} waiting studies would change triage class. Apply or reject "
        "it on the console: Policy, Calibrate from reads."
    )
    return 0


def register(sub: Any) -> None:
    cal = sub.add_parser(
        "calibrate", help="propose thresholds and a temperature from the site's reviewed studies"
    )
    cal.add_argument(
        "--since",
        metavar="YYYY-MM-DD",
        help=f"ground truth recorded from this day (default: {DEFAULT_DAYS} days ago)",
    )
    cal.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        help="sensitivity of the routine threshold (default 0.95)",
    )
    cal.add_argument("--json", action="store_true", help="one JSON line on stdout")
    cal.set_defaults(handler=cmd_calibrate)
