"""JSON API (session or bearer token), Prometheus metrics, health check."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import text

from dashboard import db, monitor, settings
from dashboard.auth import api_auth_required
from pipeline.classifier.weights import describe_weights
from pipeline.triage.filters import FilterError, WorklistFilter
from pipeline.triage.studies import worklist_document

bp = Blueprint("api", __name__)


API_MAX_LIMIT = 1000


@bp.route("/api/worklist")
@api_auth_required
def worklist() -> Any:
    """The worklist with the page's filters: status, triage, reviewed, date_from, date_to, q."""
    limit = min(API_MAX_LIMIT, max(1, request.args.get("limit", 100, type=int) or 100))
    offset = max(0, request.args.get("offset", 0, type=int) or 0)
    try:
        filters = WorklistFilter.from_args(request.args)
    except FilterError as exc:
        return jsonify(error=str(exc)), 400
    model = describe_weights(settings())
    return jsonify(worklist_document(db(), model, limit, filters, offset))


@bp.route("/api/monitor")
@api_auth_required
def monitor_json() -> Any:
    return jsonify(monitor.overview(db(), settings()))


@bp.route("/healthz")
def healthz() -> Any:
    # Unauthenticated on purpose (load balancers): says only whether the database answers.
    try:
        db().execute(text("SELECT 1"))
        return jsonify(status="ok")
    except Exception:
        return jsonify(status="database unavailable"), 503


def _histogram(name: str, doc: str, data: dict[str, Any]) -> HistogramMetricFamily:
    buckets = [(str(float(b)), c) for b, c in data["buckets"]] + [("+Inf", data["count"])]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=data["sum"])


class _Collector:
    def __init__(self, overview: dict[str, Any]) -> None:
        self.overview = overview

    def collect(self) -> Any:
        o = self.overview
        studies = GaugeMetricFamily("cxr_studies", "Studies by status", labels=["status"])
        for status, n in o["studies"].items():
            studies.add_metric([status], n)
        yield studies
        queues = GaugeMetricFamily("cxr_queue_depth", "Messages waiting per lane", labels=["lane"])
        for lane, n in o["queues"].items():
            if n is not None:
                queues.add_metric([lane], n)
        yield queues
        if o["workers"] is not None:
            yield GaugeMetricFamily(
                "cxr_workers_alive", "Workers with a fresh heartbeat", value=len(o["workers"])
            )
        yield _histogram("cxr_batch_size", "Images per forward pass", o["batch_size"])
        yield _histogram(
            "cxr_inference_seconds", "Seconds per forward pass", o["inference_seconds"]
        )
        yield _histogram(
            "cxr_end_to_end_seconds",
            "Seconds from ingest to result per image",
            o["end_to_end_seconds"],
        )


class _OutboxCollector:
    """Per destination: outbox items by status, the oldest waiting, up or failing."""

    def __init__(self, states: list[dict[str, Any]]) -> None:
        self.states = states

    def collect(self) -> Any:
        items = GaugeMetricFamily(
            "cxr_outbox_items",
            "Outbox items per destination and status",
            labels=["destination", "status"],
        )
        up = GaugeMetricFamily(
            "cxr_destination_up",
            "1 when the destination's last send succeeded (0: failing, or disabled)",
            labels=["destination"],
        )
        waiting = GaugeMetricFamily(
            "cxr_outbox_oldest_waiting_seconds",
            "Age of the oldest unsent item",
            labels=["destination"],
        )
        now = datetime.now(UTC)
        for d in self.states:
            for status, n in d["counts"].items():
                items.add_metric([d["name"], status], n)
            up.add_metric([d["name"]], 1.0 if d["state"] == "ok" else 0.0)
            if d["oldest_waiting"]:
                since = datetime.fromisoformat(d["oldest_waiting"].rstrip("Z")).replace(tzinfo=UTC)
                waiting.add_metric([d["name"]], max(0.0, (now - since).total_seconds()))
        yield items
        yield up
        yield waiting


class _PerformanceCollector:
    """Live performance per window (7d, 30d, 90d) overall and per institution, modality, view
    (``pipeline.monitoring.live``); a value absent where it is undefined (no studies)."""

    RATES = ("sensitivity", "specificity", "ppv", "npv")

    def __init__(self, windows: dict[int, dict[str, Any]]) -> None:
        self.windows = windows

    def collect(self) -> Any:
        labels = ["window", "split", "group"]
        reviewed = GaugeMetricFamily(
            "cxr_live_reviewed",
            "Scored studies whose ground truth was recorded in the window",
            labels=labels,
        )
        abnormal = GaugeMetricFamily("cxr_live_abnormal", "Of those, read abnormal", labels=labels)
        auc = GaugeMetricFamily("cxr_live_auc", "AUC against the reads", labels=labels)
        lo = GaugeMetricFamily(
            "cxr_live_auc_ci_lower", "AUC 95 % interval, lower (DeLong)", labels=labels
        )
        hi = GaugeMetricFamily(
            "cxr_live_auc_ci_upper", "AUC 95 % interval, upper (DeLong)", labels=labels
        )
        rates = {
            r: GaugeMetricFamily(
                f"cxr_live_{r}", f"{r} at a triage threshold", labels=[*labels, "threshold"]
            )
            for r in self.RATES
        }
        top = GaugeMetricFamily(
            "cxr_live_top_share",
            "Share of abnormal reads whose study was urgent or critical when read",
            labels=labels,
        )
        ece = GaugeMetricFamily(
            "cxr_live_calibration_error", "Expected calibration error (10 bins)", labels=labels
        )
        for days, doc in sorted(self.windows.items()):
            groups = [("all", "all", doc["overall"])]
            groups += [(split, g["group"], g) for split, rows in doc["by"].items() for g in rows]
            for split, name, g in groups:
                key = [f"{days}d", split, name]
                reviewed.add_metric(key, g["reviewed"])
                abnormal.add_metric(key, g["abnormal"])
                if g["auc"]["auc"] is not None:
                    auc.add_metric(key, g["auc"]["auc"])
                if g["auc"]["ci"]:
                    lo.add_metric(key, g["auc"]["ci"][0])
                    hi.add_metric(key, g["auc"]["ci"][1])
                for threshold, t in g["thresholds"].items():
                    for r in self.RATES:
                        if t[r]["value"] is not None:
                            rates[r].add_metric([*key, threshold], t[r]["value"])
                if g["top"]["value"] is not None:
                    top.add_metric(key, g["top"]["value"])
                if g["calibration"]["ece"] is not None:
                    ece.add_metric(key, g["calibration"]["ece"])
        yield from (reviewed, abnormal, auc, lo, hi, *rates.values(), top, ece)


class _DriftCollector:
    """Drift of the recent films against the reference (``pipeline.monitoring.drift``)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def collect(self) -> Any:
        psi = GaugeMetricFamily(
            "cxr_drift_psi",
            "Population stability index of the last scored images against the reference",
            labels=["feature"],
        )
        for name, f in self.doc["features"].items():
            psi.add_metric([name], f["psi"])
        alarm = GaugeMetricFamily(
            "cxr_drift_alarm", f"1 while a feature's PSI is past the limit ({self.doc['limit']})"
        )
        alarm.add_metric([], 1.0 if self.doc["alarm"] else 0.0)
        yield psi
        yield alarm


@bp.route("/metrics")
@api_auth_required(scope="metrics")
def metrics() -> Response:
    from pipeline.monitoring.live import live_performance_windows
    from pipeline.results.console import destination_states

    registry = CollectorRegistry()
    registry.register(_Collector(monitor.overview(db(), settings())))
    registry.register(_OutboxCollector(destination_states(db())))
    thresholds = describe_weights(settings()).get("thresholds")
    registry.register(
        _PerformanceCollector(live_performance_windows(db(), thresholds, datetime.now(UTC)))
    )
    from dashboard.drift_view import drift_state

    registry.register(_DriftCollector(drift_state()))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
