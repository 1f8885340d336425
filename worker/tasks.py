"""Thin tasks: take image ids, call the pipeline, commit."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from celery import signals
from celery_batches import Batches, SimpleRequest

from pipeline.classifier import Classifier
from pipeline.db import make_engine, make_session_factory
from pipeline.inference import classify_images
from pipeline.queue import TASK_CLASSIFY, redis_client
from pipeline.redis_server import resolve_redis_url
from pipeline.settings import Settings
from pipeline.weights import ensure_weights
from worker.celery_app import app

log = logging.getLogger(__name__)
_settings: Settings = app.conf.cxr_settings


@dataclass
class Runtime:
    """What a worker process loads once: model, database sessions, Redis client."""

    classifier: Classifier
    factory: Any
    redis: Any


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime() -> Runtime:
    """Load the model and open connections on first use, once per process."""
    global _runtime
    with _lock:
        if _runtime is None:
            weights = ensure_weights(_settings)
            classifier = Classifier(weights, _settings.device, _settings.torch_threads)
            factory = make_session_factory(make_engine(_settings.db_url))
            url = resolve_redis_url(_settings)
            _runtime = Runtime(classifier, factory, redis_client(url or app.conf.broker_url))
    return _runtime


@signals.worker_init.connect
def _quiet_pydicom(**_: Any) -> None:
    # pydicom logs invalid header values verbatim; those can be patient names.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


@signals.worker_ready.connect
def _load_model_at_start(**_: Any) -> None:
    get_runtime()


@app.task(
    base=Batches,
    name=TASK_CLASSIFY,
    flush_every=_settings.batch_size,
    flush_interval=_settings.batch_wait_ms / 1000.0,
    acks_late=True,
    time_limit=600,
    ignore_result=True,
)
def classify_image(requests: list[SimpleRequest]) -> dict[str, int]:
    """Classify a batch of images (one message per image id) in one forward pass."""
    ids = [int(r.args[0]) for r in requests if r.args]
    runtime = get_runtime()
    result = classify_images(runtime.factory, runtime.redis, runtime.classifier, ids)
    log.info(
        "batch of %d messages: %d done, %d failed, %d already final, forward %.0f ms",
        len(ids),
        len(result.done),
        len(result.failed),
        len(result.skipped),
        result.seconds * 1000,
    )
    return {"done": len(result.done), "failed": len(result.failed)}
