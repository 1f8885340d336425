"""JSON API (session or bearer token), Prometheus metrics, health check."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import text

from dashboard import db, monitor, settings
from dashboard.auth import api_auth_required
from pipeline.studies import worklist_document
from pipeline.weights import describe_weights

bp = Blueprint("api", __name__)


@bp.route("/api/worklist")
@api_auth_required
def worklist() -> Any:
    limit = request.args.get("limit", type=int)
    return jsonify(worklist_document(db(), describe_weights(settings()), limit))


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


class _Collector:
    def __init__(self, overview: dict[str, Any]) -> None:
        self.overview = overview

    def collect(self) -> Any:
        studies = GaugeMetricFamily("cxr_studies", "Studies by status", labels=["status"])
        for status, n in self.overview["studies"].items():
            studies.add_metric([status], n)
        yield studies
        queues = GaugeMetricFamily("cxr_queue_depth", "Messages waiting per lane", labels=["lane"])
        for lane, n in self.overview["queues"].items():
            if n is not None:
                queues.add_metric([lane], n)
        yield queues


@bp.route("/metrics")
@api_auth_required
def metrics() -> Response:
    registry = CollectorRegistry()
    registry.register(_Collector(monitor.overview(db(), settings())))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
