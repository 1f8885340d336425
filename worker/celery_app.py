"""The Celery application, built from the settings. Importing it opens no connection."""

from __future__ import annotations

from celery import Celery

from pipeline.queue.dispatch import QUEUES, TASK_CLASSIFY, lane_queues
from pipeline.queue.locate import recorded_redis_url
from pipeline.settings import ConfigError, Settings


def create_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app: JSON only, late acks, two lanes with live drained first."""
    settings = settings or Settings.from_env()
    # Not pinged: building the app opens no connection (the worker connects when it starts,
    # and retries while the broker is away).
    broker = settings.redis_url or recorded_redis_url(settings)
    if broker is None:
        raise ConfigError(
            "no Redis to connect to: set CXR_REDIS_URL, or start `cxr-triage run` on this data dir"
        )
    app = Celery("cxr_triage", broker=broker, include=["worker.tasks"], set_as_current=True)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_queues=lane_queues(),
        task_default_queue=QUEUES["live"],
        task_default_exchange=QUEUES["live"],
        task_default_routing_key=QUEUES["live"],
        task_routes={TASK_CLASSIFY: {"queue": QUEUES["live"]}},
        # Prefetch exactly one batch: the solo pool fetches nothing while a batch runs, so
        # after each batch the next B messages are taken live lane first and a live study
        # waits behind at most one batch of bulk work. More would also hide work from
        # other workers.
        worker_prefetch_multiplier=settings.batch_size,
        broker_transport_options={
            # Poll the queues in the listed order: live before bulk.
            "queue_order_strategy": "priority",
            # An unacknowledged message returns to its queue after this long (a dead worker).
            "visibility_timeout": settings.visibility_timeout_s,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.conf.cxr_settings = settings
    return app


app = create_celery()
