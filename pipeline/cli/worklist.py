"""``cxr-triage worklist``: the studies in reading order, as a table or one JSON line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline import migrate
from pipeline.classifier.weights import describe_weights
from pipeline.db import session_factory, session_scope
from pipeline.settings import Settings
from pipeline.triage.studies import worklist_document


def register(sub: Any) -> None:
    wl = sub.add_parser("worklist", help="studies by priority")
    wl.add_argument("--limit", type=int)
    wl.add_argument("--json", action="store_true")
    wl.set_defaults(handler=cmd_worklist)


def cmd_worklist(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(settings.db_url)
    model = describe_weights(settings)
    with session_scope(session_factory(settings)) as session:
        doc = worklist_document(session, model, args.limit)
    if args.json:
        print(json.dumps(doc))
        return 0
    if not model["trained"]:
        print("UNTRAINED MODEL: priorities below are random and must not be used for triage.")
    print(
        f"{'id':>6} {'priority':>8} {'triage':<9} {'label':<10} {'p_abn':>6} {'status':<10} received"
    )
    for s in doc["studies"]:
        prio = "-" if s["priority"] is None else f"{s['priority']:.1f}"
        p = "-" if s["p_abnormal"] is None else f"{s['p_abnormal']:.3f}"
        print(
            f"{s['id']:>6} {prio:>8} {s['triage_class'] or '-':<9} {s['label'] or '-':<10} "
            f"{p:>6} {s['status']:<10} {s['received_at']}"
        )
    return 0
