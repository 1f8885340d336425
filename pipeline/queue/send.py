"""Send committed, queued images to the workers: model inputs into Redis, then their tasks."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.imaging import decode as imaging
from pipeline.models import Image
from pipeline.profiling import STAGES
from pipeline.queue.dispatch import Dispatcher, delete_payloads, put_payloads
from pipeline.states import State

log = logging.getLogger(__name__)


def enqueue(
    factory: sessionmaker[Session],
    redis_client: Any,
    dispatcher: Dispatcher,
    image_ids: list[int],
    input_size: int,
    ttl_s: int,
    lane: str = "live",
    previews: Mapping[int, bytes] | None = None,
    preprocess: str = "resize",
) -> int:
    """Put each image's model input in Redis, then send its task; return how many were sent.

    The model input is built from the stored preview: from ``previews`` where the caller still
    holds it, else read back from the database, through the weights' ``preprocess``.
    """
    if not image_ids:
        return 0
    found = {i: previews[i] for i in image_ids if previews and previews.get(i) is not None}
    missing = [i for i in image_ids if i not in found]
    if missing:
        session = factory()
        try:
            rows = session.execute(select(Image.id, Image.preview).where(Image.id.in_(missing)))
            found.update({image_id: preview for image_id, preview in rows if preview is not None})
        finally:
            session.close()
    ready = [i for i in image_ids if i in found]
    with STAGES.time("model_input", len(ready)):
        inputs = {i: imaging.model_input(found[i], input_size, preprocess) for i in ready}
    with STAGES.time("payload", len(ready)):
        put_payloads(redis_client, inputs, ttl_s)
    try:
        with STAGES.time("send", len(ready)):
            return dispatcher.send(ready, lane=lane)
    except Exception:
        # A payload is no use without its message; the reconciler re-sends both.
        delete_payloads(redis_client, ready)
        raise


def mark_unsent(factory: sessionmaker[Session], image_ids: Iterable[int]) -> None:
    """Record that these committed, queued images' messages could not be sent (Redis down,
    or refusing writes on a full disk): a queued image without ``queued_at`` is sent by the
    reconciler's next check instead of waiting out the stuck timeout. Best effort: when the
    database is unreachable too, the stuck timeout remains."""
    ids = list(image_ids)
    if not ids:
        return
    try:
        with session_scope(factory) as session:
            session.execute(
                update(Image)
                .where(Image.id.in_(ids), Image.status == State.QUEUED)
                .values(queued_at=None)
                .execution_options(synchronize_session=False)
            )
    except Exception as exc:
        log.warning("could not mark %d unsent images (%s)", len(ids), type(exc).__name__)
