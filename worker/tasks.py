"""Thin tasks: take image ids, call the pipeline, commit."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import sqlalchemy.exc
from celery import signals
from celery_batches import SimpleRequest

from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier
from pipeline.classifier.weights import ensure_weights
from pipeline.db import session_factory
from pipeline.profiling import PROCESS, STAGES, push
from pipeline.queue.dispatch import (
    HEARTBEAT_PREFIX,
    HEARTBEAT_TTL_S,
    QUEUES,
    TASK_CLASSIFY,
    redis_client,
)
from pipeline.queue.locate import resolve_redis_url
from pipeline.service.logs import log_context, task_label, use_format
from pipeline.settings import Settings
from worker.batches import ReconnectSafeBatches
from worker.celery_app import app

log = logging.getLogger(__name__)
_settings: Settings = app.conf.cxr_settings


@dataclass
class Runtime:
    """What a worker process loads once: model, database sessions, Redis client; the live
    and shadow models follow the registry (pipeline.classifier.registry), looked at between batches."""

    classifier: Classifier
    factory: Any
    redis: Any
    shadow: Classifier | None = None
    checked: float = 0.0

    def follow_registry(self) -> None:
        """Load the live and shadow models the registry names (at most every CHECK_S s)."""
        from pipeline.classifier.registry import in_force

        if time.monotonic() - self.checked < _settings.registry_check_s:
            return
        self.checked = time.monotonic()
        with self.factory() as session:
            live, shadow = in_force(session)
            live_ref = (live.version, live.path) if live else None
            shadow_ref = (shadow.version, shadow.path) if shadow else None
        if live_ref and live_ref[0] != self.classifier.version:
            log.warning("switching the live model %s -> %s", self.classifier.version, live_ref[0])
            self.classifier = _load(Path(live_ref[1]))
        if shadow_ref is None:
            if self.shadow is not None:
                log.info("shadow model %s stopped", self.shadow.version)
            self.shadow = None
        elif self.shadow is None or self.shadow.version != shadow_ref[0]:
            log.info("shadow model %s: scoring beside the live model", shadow_ref[0])
            self.shadow = _load(Path(shadow_ref[1]))


def _load(weights: Path) -> Classifier:
    return Classifier(
        weights, _settings.device, _settings.torch_threads, _settings.runtime, _settings.batch_size
    )


_runtime: Runtime | None = None
_lock = threading.Lock()
# When the batch this process is running started (time.time()); None between batches. The
# heartbeat reports it, so a batch that never returns (a hung forward pass, a stalled disk)
# is seen as a hung worker although its heartbeat thread still beats (pipeline.queue.reconcile).
_busy_since: float | None = None
# This process's name, and its wall and CPU clocks when it last pushed its profile.
_name = "worker"
_profile_clock: tuple[float, float] | None = None


def get_runtime() -> Runtime:
    """Load the model and open connections on first use, once per process."""
    global _runtime
    with _lock:
        if _runtime is None:
            factory = session_factory(_settings)
            url = resolve_redis_url(_settings)
            _runtime = Runtime(
                _load(ensure_weights(_settings)), factory, redis_client(url or app.conf.broker_url)
            )
            try:
                _runtime.follow_registry()
            except Exception:  # an older database (no registry yet): the settings' weights
                log.exception(
                    "the model registry could not be read; running %s", _runtime.classifier.version
                )
    return _runtime


@signals.after_setup_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    # Celery's root handler, in the project's format: each line names its task.
    use_format(logger.handlers)


@signals.worker_init.connect
def _quiet_pydicom(**_: Any) -> None:
    # pydicom logs invalid header values verbatim; those can be patient names.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


@signals.worker_ready.connect
def _load_model_at_start(sender: Any = None, **_: Any) -> None:
    global _name, _profile_clock
    runtime = get_runtime()
    name = getattr(sender, "hostname", None) or "worker"
    _name = f"{name}:{os.getpid()}"
    STAGES.take()  # loading and warming the model is not a batch's work
    _profile_clock = (time.perf_counter(), time.process_time())
    # Taken here, before this process consumes anything: every claim it makes is later.
    since = time.time()
    threading.Thread(target=_heartbeat, args=(runtime, name, since), daemon=True).start()


def _heartbeat(runtime: Runtime, name: str, since: float) -> None:
    # A key with a TTL per live worker: the dashboard counts them ("workers alive"), and the
    # reconciler re-sends what a worker whose key expired had claimed.
    # "since": when this process started beating. A claim older than that under the same name
    # was made by a process that died and was restarted under the name (pipeline.queue.reconcile).
    # "busy_since": when the batch now running started (None: idle). A process that is frozen
    # (SIGSTOP, swapped out) stops beating and its key expires.
    info = {
        "model": runtime.classifier.version,
        "device": str(runtime.classifier.device),
        "batch_size": _settings.batch_size,
        "since": since,
    }
    while True:
        try:
            beat = json.dumps({**info, "busy_since": _busy_since})
            runtime.redis.set(f"{HEARTBEAT_PREFIX}{name}", beat, ex=HEARTBEAT_TTL_S)
        except redis.exceptions.RedisError:
            log.warning("heartbeat: Redis unavailable")
        time.sleep(HEARTBEAT_TTL_S / 3)


# Errors that pass: the database or Redis restarting. Anything else is a bug or a poison item,
# which pipeline.classifier.inference already confines to the image that caused it.
TRANSIENT_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
MAX_RETRIES = 8


def retry_later(requests: list[SimpleRequest], exc: Exception) -> int:
    """Re-send each message with exponential backoff; the originals are acked after this returns."""
    sent = 0
    for req in requests:
        attempt = int((req.kwargs or {}).get("retry", 0))
        if attempt >= MAX_RETRIES:
            log.error(
                "image %s: giving up retries after %s; the reconciler re-sends it from the "
                "database",
                req.args[0] if req.args else "?",
                type(exc).__name__,
            )
            continue
        queue = (req.delivery_info or {}).get("routing_key") or QUEUES["live"]
        app.send_task(
            TASK_CLASSIFY,
            args=list(req.args),
            kwargs={"retry": attempt + 1},
            queue=queue,
            routing_key=queue,
            countdown=min(60, 2**attempt),
        )
        sent += 1
    log.warning("transient %s: %d messages re-sent with backoff", type(exc).__name__, sent)
    return sent


class ClassifyBatches(ReconnectSafeBatches):
    """The classification task's batching: pushes this process's profile after each batch."""

    abstract = True

    def on_flushed(self) -> None:
        global _profile_clock
        if _runtime is None or _profile_clock is None:
            return
        sums = STAGES.take()
        wall, cpu = time.perf_counter(), time.process_time()
        sums[PROCESS] = (
            (wall - _profile_clock[0]) * 1000.0,
            (cpu - _profile_clock[1]) * 1000.0,
            0.0,
        )
        _profile_clock = (wall, cpu)
        push(_runtime.redis, _name, sums)


@app.task(
    base=ClassifyBatches,
    name=TASK_CLASSIFY,
    flush_every=_settings.batch_size,
    flush_interval=_settings.batch_wait_ms / 1000.0,
    acks_late=True,
    time_limit=600,
    ignore_result=True,
)
def classify_image(requests: list[SimpleRequest]) -> dict[str, int]:
    """Classify a batch of images (one message per image id) in one forward pass."""
    with STAGES.time("task", len(requests)), log_context(task_label([r.id for r in requests])):
        return _classify(requests)


def _classify(requests: list[SimpleRequest]) -> dict[str, int]:
    global _busy_since
    done = failed = 0
    size = _settings.batch_size
    # celery-batches can hand over more than flush_every requests when retried (ETA) messages
    # fall due together (clokep/celery-batches#84): never run a forward pass larger than B.
    for chunk in (requests[i : i + size] for i in range(0, len(requests), size)):
        ids = [int(r.args[0]) for r in chunk if r.args]
        _busy_since = time.time()
        try:
            runtime = get_runtime()
            try:
                runtime.follow_registry()
            except TRANSIENT_ERRORS:
                raise
            except Exception:  # a registry row this worker cannot load: keep the model it has
                log.exception(
                    "the model registry could not be followed; still running %s",
                    runtime.classifier.version,
                )
            worker = chunk[0].hostname if chunk else None
            result = classify_images(
                runtime.factory, runtime.redis, runtime.classifier, ids, worker, runtime.shadow
            )
        except TRANSIENT_ERRORS as exc:
            retry_later(chunk, exc)
            continue
        finally:
            _busy_since = None
        log.info(
            "batch of %d messages: %d done, %d failed, %d already final, forward %.0f ms",
            len(ids),
            len(result.done),
            len(result.failed),
            len(result.skipped),
            result.seconds * 1000,
        )
        if result.revoked:
            log.warning(
                "%d results dropped: their claims were re-sent while this batch ran "
                "(this worker was judged dead or hung)",
                len(result.revoked),
            )
        done, failed = done + len(result.done), failed + len(result.failed)
    return {"done": done, "failed": failed}
