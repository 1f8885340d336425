"""Ingest: validate, de-duplicate, persist, then enqueue.

The study row is committed before its task is sent (persist first, then enqueue), so a worker
never looks for a row that does not exist and a lost message can be re-sent from the database.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.imaging import decode as imaging
from pipeline.imaging.decode import DecodedImage, Limits, RejectedInput
from pipeline.models import Image, Study, utcnow
from pipeline.queue.dispatch import (
    Dispatcher,
    QueueFull,
    delete_payloads,
    is_queue_full,
    put_payloads,
)
from pipeline.service.profiling import STAGES
from pipeline.states import ACTIVE_STATES, State
from pipeline.storage import StorageFull, is_storage_full
from pipeline.store import instances
from pipeline.store.instances import InstanceStore

log = logging.getLogger(__name__)


@dataclass
class IngestItem:
    path: str
    study_id: int | None
    image_id: int | None
    status: str
    reason: str | None = None
    duplicate: bool = False
    # Why it was rejected, as a code (imaging.RejectedInput.code); None unless rejected.
    code: str | None = None
    # The stored preview of a newly queued image, kept so enqueueing need not read it back.
    preview: bytes | None = field(default=None, repr=False, compare=False)


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


def iter_input_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Yield files named directly, and files in folders (recursive) that look ingestible."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.name.startswith("."):
                    continue
                if child.suffix.lower() in imaging.ACCEPTED_SUFFIXES or _has_dicom_magic(child):
                    yield child
        else:
            yield path


def _has_dicom_magic(path: Path) -> bool:
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _study_fields(meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    # Form or sidecar values win over the header; both are cleaned to storable text.
    merged = {**meta, **imaging.header_fields(extra)}
    priority = merged.get("RequestedProcedurePriority") or merged.get("StudyPriorityID")
    return {
        "study_uid": merged.get("StudyInstanceUID"),
        "accession_number": merged.get("AccessionNumber"),
        "patient_id": merged.get("PatientID"),
        "patient_name": merged.get("PatientName"),
        "study_date": merged.get("StudyDate"),
        "requested_priority": (str(priority).upper() if priority else None),
    }


def _existing(session: Session, key: str, filename: str) -> IngestItem | None:
    found = session.scalars(select(Image).where(Image.dedup_key == key)).first()
    if found is None:
        return None
    return IngestItem(
        filename,
        found.study_id,
        found.id,
        found.status,
        found.reason,
        duplicate=True,
        code=_code(found),
    )


def _code(image: Any) -> str | None:
    """A rejected image's code, as recorded with it (an Image or a row with status and meta)."""
    if image.status != State.REJECTED:
        return None
    return str((image.meta or {}).get("rejection") or "unreadable")


def record_rejection(
    session: Session,
    key: str,
    filename: str,
    reason: str,
    source: str,
    lane: str,
    code: str = "unreadable",
) -> IngestItem:
    """Write a rejected study and image with the reason (not committed); dedup first."""
    existing = _existing(session, key, filename)
    if existing is not None:
        return existing
    now = utcnow()
    study = Study(source=source, lane=lane, status=State.REJECTED, reason=reason, done_at=now)
    session.add(study)
    session.flush()
    image = Image(
        study_id=study.id,
        dedup_key=key,
        filename=imaging.storable_name(filename),
        kind="unknown",
        status=State.REJECTED,
        reason=reason,
        done_at=now,
        meta={"rejection": code},
    )
    session.add(image)
    session.flush()
    return IngestItem(filename, study.id, image.id, State.REJECTED, reason, code=code)


def _file_key(path: Path) -> str:
    """Content-hash dedup key of a file, read in chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class _Prepared:
    """One file decoded, before any database work: what its rows need, without the pixels."""

    filename: str
    key: str
    decoded: DecodedImage | None
    reason: str | None
    preview: bytes | None
    code: str | None = None  # imaging.RejectedInput.code when it was refused


def _prepare(data: bytes, filename: str, limits: Limits, extra_meta: dict[str, Any]) -> _Prepared:
    try:
        with STAGES.time("decode"):
            decoded = imaging.decode_bytes(data, filename, limits)
    except RejectedInput as exc:
        return _Prepared(filename, imaging.content_key(data), None, str(exc), None, exc.code)
    if decoded.kind != "dicom":
        # JPEG/PNG carry no header: a sidecar JSON or the upload form gives their fields.
        decoded.meta.update(imaging.header_fields(extra_meta))
    with STAGES.time("preview"):
        preview = imaging.encode_preview(decoded.pixels)
    # The display image's grey level, for drift (pipeline.monitoring.drift): a strided sample is enough.
    sample = decoded.pixels[::4, ::4]
    if sample.size:
        decoded.meta["input"] = {
            "mean": round(float(sample.mean()), 1),
            "std": round(float(sample.std()), 1),
        }
    decoded.pixels = decoded.pixels[:0]  # the chunk holds previews, not full images
    return _Prepared(filename, decoded.dedup_key, decoded, None, preview)


def persist_file(
    session: Session,
    data: bytes,
    filename: str,
    limits: Limits,
    source: str = "cli",
    lane: str = "live",
    extra_meta: dict[str, Any] | None = None,
    store: InstanceStore | None = None,
) -> IngestItem:
    """Decode one file and write its study and image rows (not committed); dedup first."""
    return persist_files(session, [(data, filename)], limits, source, lane, extra_meta, store)[0]


def persist_files(
    session: Session,
    files: list[tuple[bytes, str]],
    limits: Limits,
    source: str = "cli",
    lane: str = "live",
    extra_meta: dict[str, Any] | None = None,
    store: InstanceStore | None = None,
) -> list[IngestItem]:
    """Decode files and write their study and image rows (not committed), in order.

    The lot costs one dedup query, one study lookup and one flush (multi-row INSERTs),
    however many files it holds. A file already stored, or earlier in the lot, is reported as
    a duplicate of that image; images with one StudyInstanceUID share one study.

    With a ``store``, every accepted file is kept there as DICOM (``pipeline.store.instances``) before
    the rows are committed, and a study without a StudyInstanceUID is given one.
    """
    extra = extra_meta or {}
    prepared = [_prepare(data, name, limits, extra) for data, name in files]
    if store is not None and any(p.decoded is not None for p in prepared):
        store.check_room(session)
    keys = {p.key for p in prepared}
    known = {
        row.dedup_key: row
        for row in session.execute(
            select(
                Image.id, Image.study_id, Image.status, Image.reason, Image.dedup_key, Image.meta
            ).where(Image.dedup_key.in_(keys))
        )
    }
    fields = [_study_fields(p.decoded.meta, extra) if p.decoded else None for p in prepared]
    uids = {f["study_uid"] for f in fields if f and f["study_uid"]}
    studies: dict[str, Study] = {}
    if uids:
        for found in session.scalars(
            select(Study).where(Study.study_uid.in_(uids)).order_by(Study.id)
        ):
            studies.setdefault(str(found.study_uid), found)  # the oldest, as one lookup finds
    # dedup key -> the rows written for its first file in this lot
    written: dict[str, tuple[Image, Study]] = {}
    plans: list[tuple[_Prepared, Image | None, Study | None]] = []
    now = utcnow()
    with session.no_autoflush:
        for p, f in zip(prepared, fields, strict=True):
            if p.key in known or p.key in written:
                plans.append((p, None, None))
                continue
            if store is not None and f is not None and not f["study_uid"]:
                f["study_uid"] = instances.derived_uid("study", p.key)
            if p.decoded is None or f is None:
                reason = p.reason or "rejected"
                study = Study(
                    source=source, lane=lane, status=State.REJECTED, reason=reason, done_at=now
                )
                image = Image(
                    study=study,
                    dedup_key=p.key,
                    filename=imaging.storable_name(p.filename),
                    kind="unknown",
                    status=State.REJECTED,
                    reason=reason,
                    done_at=now,
                    meta={"rejection": p.code or "unreadable"},
                )
            else:
                image, study = _new_image(p, p.decoded, f, studies, source, lane)
            session.add(image)
            written[p.key] = (image, study)
            plans.append((p, image, study))
    session.flush()
    if store is not None:
        _keep_instances(session, store, files, plans, fields)
    items = []
    for p, written_image, written_study in plans:
        if written_image is None or written_study is None:
            if p.key in known:
                row = known[p.key]
                items.append(
                    IngestItem(
                        p.filename,
                        row.study_id,
                        row.id,
                        row.status,
                        row.reason,
                        duplicate=True,
                        code=_code(row),
                    )
                )
            else:
                first, _ = written[p.key]
                items.append(
                    IngestItem(
                        p.filename,
                        first.study_id,
                        first.id,
                        first.status,
                        first.reason,
                        duplicate=True,
                        code=_code(first),
                    )
                )
            continue
        image, study = written_image, written_study
        if image.status == State.QUEUED:
            if study.status not in (State.PROCESSING, State.QUEUED):
                # A study that was final (its other images skipped) has work again.
                study.status, study.done_at = State.QUEUED, None
        elif image.status == State.SKIPPED and not _has_other_work(session, study.id, image.id):
            # The study's only images are skipped: it is final now, not waiting for a worker.
            study.status, study.reason, study.done_at = State.SKIPPED, image.reason, utcnow()
        item = IngestItem(
            p.filename, study.id, image.id, image.status, image.reason, code=_code(image)
        )
        if image.status == State.QUEUED:
            item.preview = p.preview
        items.append(item)
    return items


def _keep_instances(
    session: Session,
    store: InstanceStore,
    files: list[tuple[bytes, str]],
    plans: list[tuple[_Prepared, Image | None, Study | None]],
    fields: list[dict[str, Any] | None],
) -> None:
    """Keep each new accepted file in the instance store: DICOM as received, else a capture."""
    with STAGES.time("store", len(files)):
        for (data, _), (p, image, study), f in zip(files, plans, fields, strict=True):
            if image is None or study is None or p.decoded is None or f is None:
                continue  # a duplicate, or rejected: nothing new to keep
            if p.decoded.kind == "dicom":
                kind, dicom = "received", data
            else:
                kind = "capture"
                dicom = instances.capture(data, p.decoded.kind, f, p.decoded.meta, p.key)
            instances.keep(session, store, study, image.id, kind, dicom, f["study_uid"])
    session.flush()


def _new_image(
    p: _Prepared,
    decoded: DecodedImage,
    fields: dict[str, Any],
    studies: dict[str, Study],
    source: str,
    lane: str,
) -> tuple[Image, Study]:
    """The image row of a decoded file, and its study: found by UID, or new."""
    study = studies.get(fields["study_uid"]) if fields["study_uid"] else None
    if study is None:
        study = Study(source=source, lane=lane, status=State.QUEUED, **fields)
        if fields["study_uid"]:
            studies[fields["study_uid"]] = study
    reason = decoded.skip_reason  # lateral view or not a chest
    status = State.SKIPPED if reason else State.QUEUED
    meta = decoded.meta
    # A new study is inserted in the same flush; an existing one is referred to by id (no load
    # of its image collection).
    link: dict[str, Any] = {"study": study} if study.id is None else {"study_id": study.id}
    image = Image(
        **link,
        dedup_key=p.key,
        filename=imaging.storable_name(p.filename),
        kind=decoded.kind,
        sop_uid=meta.get("SOPInstanceUID"),
        series_uid=meta.get("SeriesInstanceUID"),
        modality=meta.get("Modality"),
        view_position=meta.get("ViewPosition"),
        body_part=meta.get("BodyPartExamined"),
        width=decoded.width,
        height=decoded.height,
        meta=meta,
        preview=p.preview,
        status=status,
        reason=reason,
        queued_at=utcnow() if status == State.QUEUED else None,
        done_at=utcnow() if status == State.SKIPPED else None,
    )
    return image, study


def _has_other_work(session: Session, study_id: int, image_id: int) -> bool:
    """True when another image of the study is waiting, running or done."""
    found = session.scalars(
        select(Image.id).where(
            Image.study_id == study_id,
            Image.id != image_id,
            Image.status.in_((*ACTIVE_STATES, State.DONE)),
        )
    ).first()
    return found is not None


@contextmanager
def full_disk_refused() -> Iterator[None]:
    """Turn a database (or spool) write that hit a full disk into ``StorageFull``.

    The transaction it interrupted is rolled back when its session closes: nothing of the
    file is stored, and the caller says so to the sender.
    """
    try:
        yield
    except StorageFull:
        raise
    except Exception as exc:
        if is_storage_full(exc):
            log.error(
                "the disk holding the database is full (%s): refusing new studies until "
                "there is space",
                type(exc).__name__,
            )
            raise StorageFull() from exc
        raise


def ingest_bytes(
    factory: sessionmaker[Session],
    data: bytes,
    filename: str,
    limits: Limits,
    **kwargs: Any,
) -> IngestItem:
    """Persist one file in its own transaction; a concurrent duplicate is reported as such.

    A value the database refuses (a header field it cannot store) rejects this file with the
    reason; a database that is down raises, so the caller can retry, and one whose disk is
    full raises ``StorageFull`` with nothing stored.
    """
    with full_disk_refused():
        return _ingest_bytes(factory, data, filename, limits, **kwargs)


def _ingest_bytes(
    factory: sessionmaker[Session],
    data: bytes,
    filename: str,
    limits: Limits,
    **kwargs: Any,
) -> IngestItem:
    session = factory()
    try:
        try:
            item = persist_file(session, data, filename, limits, **kwargs)
            session.commit()
            return item
        except IntegrityError:
            session.rollback()
            item = persist_file(session, data, filename, limits, **kwargs)
            session.commit()
            return item
    except DataError as exc:
        session.rollback()
        log.warning("a header value could not be stored (%s)", type(exc.orig).__name__)
        reason = "the file's header holds values the database cannot store"
        item = record_rejection(
            session,
            imaging.content_key(data),
            filename,
            reason,
            kwargs.get("source", "cli"),
            kwargs.get("lane", "live"),
        )
        session.commit()
        return item
    finally:
        session.close()


def ingest_many(
    factory: sessionmaker[Session],
    files: list[tuple[bytes, str]],
    limits: Limits,
    **kwargs: Any,
) -> list[IngestItem]:
    """Persist several files in one transaction: one commit for the lot.

    A unique-key conflict (the same file arriving through another process at the same moment)
    or a value the database refuses rolls the lot back and persists each file in its own
    transaction, where the conflict is reported as a duplicate and the bad file alone is
    rejected. Other errors (the database down) propagate with nothing committed; a full disk
    as ``StorageFull``.
    """
    session = factory()
    try:
        with full_disk_refused(), STAGES.time("sql", len(files)):
            items = persist_files(session, files, limits, **kwargs)
            session.commit()
        return items
    except (IntegrityError, DataError):
        session.rollback()
    finally:
        session.close()
    return [ingest_bytes(factory, data, name, limits, **kwargs) for data, name in files]


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
            reason = (
                f"the file is {size / 1e6:.1f} MB, over the {limits.max_bytes / 1e6:.0f} MB limit"
            )
            with full_disk_refused(), session_scope(factory) as session:
                return record_rejection(session, _file_key(path), path.name, reason, source, lane)
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
