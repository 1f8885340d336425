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
from pipeline.studies import FilterError, WorklistFilter, worklist_document
from pipeline.weights import describe_weights

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
            yield GaugeMetricFamily("cxr_workers_alive", "Workers with a fresh heartbeat",
                                    value=len(o["workers"]))  # fmt: skip
        yield _histogram("cxr_batch_size", "Images per forward pass", o["batch_size"])
        yield _histogram("cxr_inference_seconds", "Seconds per forward pass",
                         o["inference_seconds"])  # fmt: skip
        yield _histogram("cxr_end_to_end_seconds", "Seconds from ingest to result per image",
                         o["end_to_end_seconds"])  # fmt: skip


class _OutboxCollector:
    """Per destination: outbox items by status, the oldest waiting, up or failing."""

    def __init__(self, states: list[dict[str, Any]]) -> None:
        self.states = states

    def collect(self) -> Any:
        items = GaugeMetricFamily("cxr_outbox_items", "Outbox items per destination and status",
                                  labels=["destination", "status"])  # fmt: skip
        up = GaugeMetricFamily("cxr_destination_up", "1 when the destination's last send "
                               "succeeded (0: failing, or disabled)", labels=["destination"])  # fmt: skip
        waiting = GaugeMetricFamily("cxr_outbox_oldest_waiting_seconds", "Age of the oldest "
                                    "unsent item", labels=["destination"])  # fmt: skip
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


@bp.route("/metrics")
@api_auth_required(scope="metrics")
def metrics() -> Response:
    from pipeline.outbox import destination_states

    registry = CollectorRegistry()
    registry.register(_Collector(monitor.overview(db(), settings())))
    registry.register(_OutboxCollector(destination_states(db())))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
