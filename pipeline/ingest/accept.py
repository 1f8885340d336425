"""Ingest: validate, de-duplicate, persist, then enqueue.

The study row is committed before its task is sent (persist first, then enqueue), so a worker
never looks for a row that does not exist and a lost message can be re-sent from the database.
Files are decoded by pipeline.ingest.prepare, their rows written by pipeline.ingest.persist in
the transactions of pipeline.ingest.transactions, and their work sent by pipeline.queue.send;
this module walks the paths and runs them a chunk at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.imaging import decode as imaging
from pipeline.imaging.decode import Limits
from pipeline.ingest.persist import IngestItem, record_rejection
from pipeline.ingest.prepare import iter_input_files
from pipeline.ingest.transactions import full_disk_refused, ingest_many
from pipeline.profiling import STAGES
from pipeline.queue.dispatch import Dispatcher, QueueFull, is_queue_full
from pipeline.queue.send import enqueue, mark_unsent
from pipeline.states import State
from pipeline.storage import StorageFull
from pipeline.store.instances import InstanceStore

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    items: list[IngestItem] = field(default_factory=list)

    @property
    def accepted(self) -> list[IngestItem]:
        return [i for i in self.items if not i.duplicate and i.status != State.REJECTED]

    @property
    def duplicates(self) -> list[IngestItem]:
        return [i for i in self.items if i.duplicate]

    @property
    def rejected(self) -> list[IngestItem]:
        return [i for i in self.items if not i.duplicate and i.status == State.REJECTED]


class Enqueuer:
    """A sink for ``ingest_paths``: sends each chunk of queued images to the workers."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        redis_client: Any,
        dispatcher: Dispatcher,
        input_size: int,
        ttl_s: int,
        lane: str = "live",
        preprocess: str = "resize",
    ) -> None:
        self.factory, self.redis, self.dispatcher = factory, redis_client, dispatcher
        self.input_size, self.ttl_s, self.lane = input_size, ttl_s, lane
        self.preprocess = preprocess

    def __call__(self, image_ids: list[int], previews: Mapping[int, bytes] | None = None) -> int:
        return enqueue(
            self.factory,
            self.redis,
            self.dispatcher,
            image_ids,
            self.input_size,
            self.ttl_s,
            lane=self.lane,
            previews=previews,
            preprocess=self.preprocess,
        )


def _read_or_reject(
    factory: sessionmaker[Session], path: Path, limits: Limits, source: str, lane: str
) -> bytes | IngestItem:
    """The file's bytes, or the item recording why it was not read (too big, unreadable)."""
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            # Recorded on a study like any bad input, without reading the file into memory.
            reason = imaging.oversize_reason(size, limits.max_bytes)
            with full_disk_refused(), session_scope(factory) as session:
                return record_rejection(
                    session, imaging.file_key(path), path.name, reason, source, lane
                )
        return path.read_bytes()
    except OSError:
        # Nothing can be read, so nothing identifies it for dedup: reported, not stored.
        return IngestItem(str(path), None, None, State.REJECTED, "the file cannot be read")


def ingest_paths(
    factory: sessionmaker[Session],
    paths: Iterable[Path],
    limits: Limits,
    source: str = "cli",
    lane: str = "live",
    sink: Callable[[list[int]], object] | None = None,
    chunk: int = 16,
    chunk_bytes: int = 64 * 1024 * 1024,
    store: InstanceStore | None = None,
) -> IngestReport:
    """Persist every file under paths; unreadable files are rejected, never fatal.

    Files are committed ``chunk`` at a time (or fewer, once ``chunk_bytes`` are read), and
    with a sink the chunk's queued image ids are handed to it right after the commit, so
    the workers start on the first studies while later ones are still being read.
    """
    report = IngestReport()
    files: list[tuple[bytes, str]] = []
    names: list[Path] = []
    held = 0

    def flush() -> None:
        nonlocal sink, held
        items = (
            ingest_many(factory, files, limits, source=source, lane=lane, store=store)
            if files
            else []
        )
        queued: dict[int, bytes | None] = {}
        for path, item in zip(names, items, strict=True):
            item.path = str(path)
            report.items.append(item)
            if item.status == State.QUEUED and not item.duplicate and item.image_id is not None:
                queued[item.image_id] = item.preview
            item.preview = None  # the report outlives the chunk; the bytes need not
        files.clear()
        names.clear()
        held = 0
        if sink is not None and queued:
            try:
                if isinstance(sink, Enqueuer):
                    sink(list(queued), previews={i: p for i, p in queued.items() if p})
                else:
                    sink(list(queued))
            except Exception as exc:
                # The rows are committed as queued: the reconciler sends them later.
                log.warning("could not send work (%s); it stays queued", type(exc).__name__)
                mark_unsent(factory, list(queued))
                sink = None
                if is_queue_full(exc):
                    raise QueueFull() from exc  # store no more: the sender sends them later

    try:
        for path in iter_input_files(paths):
            with STAGES.time("read"):
                got = _read_or_reject(factory, path, limits, source, lane)
            if isinstance(got, IngestItem):
                got.path = str(path)
                report.items.append(got)
                continue
            files.append((got, path.name))
            names.append(path)
            held += len(got)
            if len(files) >= chunk or held >= chunk_bytes:
                flush()
        flush()
    except (StorageFull, QueueFull) as exc:
        # What was committed before the disk (or the work queue) filled stands; the rest was
        # not stored. The caller reports both.
        exc.report = report
        raise
    log.info(
        "ingested %d files: %d accepted, %d duplicates, %d rejected",
        len(report.items),
        len(report.accepted),
        len(report.duplicates),
        len(report.rejected),
    )
    return report
