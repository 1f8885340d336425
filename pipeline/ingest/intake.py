"""One entry point for every live source: HTTP upload, STOW-RS, C-STORE, the watched folder.

Each source hands over bytes (or a file too large to read) and gets back the study it maps to.
The path is the CLI's: ``ingest_bytes`` commits the study row, then the image is sent to the
workers (``enqueue``). If Redis is down the row stays ``queued`` and the reconciler of
``cxr-triage run`` sends it later, so a source never loses a study and never blocks on Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_factory, session_scope
from pipeline.imaging.decode import Limits, oversize_reason
from pipeline.ingest.persist import IngestItem, record_rejection
from pipeline.ingest.transactions import full_disk_refused, ingest_bytes
from pipeline.queue.connections import open_queue
from pipeline.queue.dispatch import (
    Dispatcher,
    QueueFull,
    is_queue_full,
    queue_has_room,
)
from pipeline.queue.locate import resolve_redis_url
from pipeline.queue.send import enqueue, mark_unsent
from pipeline.settings import Settings
from pipeline.states import State
from pipeline.store.instances import InstanceStore

log = logging.getLogger(__name__)
SOURCES = ("http", "stow", "dicom", "watch", "pull")
ROOM_CHECK_S = 1.0  # how often a source asks Redis whether it is full

# DICOM failure statuses (PS3.4 Annex B, PS3.7 Annex C), shared by C-STORE and STOW-RS.
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110


def limits_of(settings: Settings) -> Limits:
    """The decoding limits the settings ask for."""
    return Limits(settings.max_file_mb * 1024 * 1024, settings.max_pixels, settings.modalities)


FAILURE_STATUS = {
    "not_an_image": STATUS_SOP_CLASS_NOT_SUPPORTED,
    "too_large": STATUS_OUT_OF_RESOURCES,
    "unreadable": STATUS_CANNOT_UNDERSTAND,
}


def failure_status(code: str | None) -> int:
    """The DICOM failure status for a rejection code (``imaging.RejectedInput.code``)."""
    return FAILURE_STATUS.get(code or "unreadable", STATUS_CANNOT_UNDERSTAND)


class Intake:
    """Persist-then-send for one process; safe to share between threads."""

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session] | None = None, lane: str = "live"
    ) -> None:
        self.settings = settings
        self.factory = factory or session_factory(settings)
        self.limits = limits_of(settings)
        self.store = InstanceStore.of(settings)
        self.lane = lane
        self._lock = threading.Lock()
        self._client: Any = None
        self._dispatcher: Dispatcher | None = None
        self._input_size: int | None = None
        self._preprocess = "resize"
        self._checked_at = -ROOM_CHECK_S  # when Redis's memory was last looked at
        self._full_at = 0.0  # when it was last found full (0: not full)

    def submit(
        self, data: bytes, filename: str, source: str, extra_meta: dict[str, Any] | None = None
    ) -> IngestItem:
        """Decode, commit and send one file; bad input comes back as a rejected item.

        Raises ``QueueFull``, with nothing stored, while Redis refuses writes at its maxmemory.
        """
        self.check_room()
        item = ingest_bytes(
            self.factory,
            data,
            filename,
            self.limits,
            source=source,
            lane=self.lane,
            extra_meta=extra_meta,
            store=self.store,
        )
        item.path = filename
        if item.status == State.QUEUED and not item.duplicate and item.image_id is not None:
            self.send([item.image_id])
        return item

    def reject(
        self, key: str, filename: str, reason: str, source: str, code: str = "unreadable"
    ) -> IngestItem:
        """Record bytes that were never decoded (too large) as a rejected study."""
        with full_disk_refused(), session_scope(self.factory) as session:
            item = record_rejection(session, key, filename, reason, source, self.lane, code)
        item.path = filename
        return item

    def reject_oversize(self, key: str, size: int, filename: str, source: str) -> IngestItem:
        """Record a file over the size limit, identified by its content hash."""
        return self.reject(
            key, filename, oversize_reason(size, self.limits.max_bytes), source, "too_large"
        )

    def send(self, image_ids: Iterable[int]) -> int:
        """Send committed images to the workers; on any Redis trouble they stay queued."""
        ids = list(image_ids)
        with self._lock:
            try:
                if not self._connect():
                    return 0
                assert self._input_size is not None and self._dispatcher is not None
                return enqueue(
                    self.factory,
                    self._client,
                    self._dispatcher,
                    ids,
                    self._input_size,
                    self.settings.payload_ttl_s,
                    lane=self.lane,
                    preprocess=self._preprocess,
                )
            except Exception as exc:
                # Committed as queued: the reconciler re-sends them from the database.
                log.warning(
                    "could not send %d images (%s); they stay queued", len(ids), type(exc).__name__
                )
                mark_unsent(self.factory, ids)
                if is_queue_full(exc):
                    self._full_at = self._checked_at = time.monotonic()  # refuse the next
                self._drop()
                return 0

    def check_room(self) -> None:
        """Raise ``QueueFull`` when Redis refuses writes at its maxmemory (asked at most once
        a second; Redis down is not full: files are stored and sent when it is back)."""
        now = time.monotonic()
        if now - self._checked_at < ROOM_CHECK_S:
            if self._full_at and now - self._full_at < ROOM_CHECK_S:
                raise QueueFull()
            return
        with self._lock:
            self._checked_at = now
            try:
                if not self._connect():
                    return
                room = queue_has_room(self._client)
            except Exception:  # unreachable: not known to be full
                self._drop()
                return
            self._full_at = 0.0 if room else now
        if not room:
            raise QueueFull()

    def _connect(self) -> bool:
        if self._dispatcher is not None:
            return True
        url = resolve_redis_url(self.settings)
        if url is None:
            return False  # no system running: `cxr-triage run` sends them when it starts
        if self._input_size is None:
            from pipeline.classifier.weights import describe_weights

            model = describe_weights(self.settings)
            self._input_size, self._preprocess = int(model["input_size"]), model["preprocess"]
        self._client, self._dispatcher = open_queue(url)
        return True

    def _drop(self) -> None:
        dispatcher, client = self._dispatcher, self._client
        self._dispatcher = self._client = None
        for closeable in (dispatcher, client):
            try:
                if closeable is not None:
                    closeable.close()
            except Exception:  # closing a broken connection must not mask the first error
                log.debug("closing a broken Redis connection failed", exc_info=True)

    def close(self) -> None:
        """Release the Redis connections."""
        with self._lock:
            self._drop()
