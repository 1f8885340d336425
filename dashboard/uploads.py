"""Request bodies for the ingest endpoints: parsed as they stream in, the parts spooled to disk.

The ``multipart`` package parses the stream (RFC 2046); its parser is written for
``multipart/form-data``, which requires Content-Disposition on every part, and STOW-RS sends
``multipart/related`` (RFC 2387), whose parts have none, so a subclass lifts that one rule.
Part payloads are copied to one temporary file under a size limit (never held in memory whole)
and mapped; a part is a range of the mapping, so a part over the per-file limit can be hashed
without ever being copied.
"""

from __future__ import annotations

import hashlib
import mmap
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from multipart import MultipartError, MultipartSegment, PushMultipartParser

CHUNK = 1 << 20
Body = mmap.mmap | bytes


class MalformedBody(ValueError):
    """The body is not the multipart message its Content-Type announces; says what is wrong."""


class BodyTooLarge(Exception):
    """The body is larger than the request limit."""


class RelatedParser(PushMultipartParser):
    """A multipart/related parser: parts are told apart by Content-Type, not Content-Disposition."""

    def _create_segment(self, headerlist: list[tuple[str, str]]) -> MultipartSegment:
        return MultipartSegment(headerlist)


@dataclass
class Part:
    """One part: its headers (as the parser read them) and its payload's range of the body."""

    segment: Any
    start: int
    end: int = -1

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def content_type(self) -> str:
        return self.segment.content_type or ""

    @property
    def name(self) -> str | None:
        return self.segment.name

    @property
    def filename(self) -> str | None:
        return self.segment.filename


@contextmanager
def received(
    stream: IO[bytes], boundary: str, limit: int, related: bool = False
) -> Iterator[tuple[Body, list[Part]]]:
    """The body's parts and their spooled payloads, mapped read-only; BodyTooLarge past ``limit``."""
    with tempfile.TemporaryFile(prefix="cxr-upload-") as spool:
        parts = _spool(stream, boundary, limit, related, spool)
        spool.flush()
        if spool.tell() == 0:
            yield b"", parts
            return
        with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped, parts


def _spool(
    stream: IO[bytes], boundary: str, limit: int, related: bool, spool: IO[bytes]
) -> list[Part]:
    parts: list[Part] = []
    current: Part | None = None
    total = 0
    try:
        parser = (RelatedParser if related else PushMultipartParser)(boundary)
        while block := stream.read(CHUNK):
            total += len(block)
            if total > limit:
                raise BodyTooLarge(f"the request body is over the {limit / 1e6:.0f} MB limit")
            for event in parser.parse(block):
                if isinstance(event, MultipartSegment):
                    current = Part(event, spool.tell())
                    parts.append(current)
                elif isinstance(event, bytes | bytearray):
                    spool.write(event)
                elif current is not None:  # None: the end of the current part
                    current.end, current = spool.tell(), None
    except MultipartError as exc:
        text = str(exc)
        raise MalformedBody(text[:1].lower() + text[1:]) from exc
    if total == 0:
        raise MalformedBody("the request body is empty")
    try:
        parser.close()
    except MultipartError as exc:
        raise MalformedBody(_unfinished(parts, current)) from exc
    return parts


def _unfinished(parts: list[Part], current: Part | None) -> str:
    if current is not None:
        return f"part {len(parts)} has no closing boundary: the body is truncated"
    if not parts:
        return "no part is complete: the body is truncated or lacks the Content-Type's boundary"
    return f"part {len(parts) + 1} has no blank line after its headers: the body is truncated"


def read(body: Body, part: Part, limit: int | None = None) -> bytes:
    """The payload of one part (its first ``limit`` bytes when a limit is given)."""
    end = part.end if limit is None else min(part.end, part.start + limit)
    return bytes(body[part.start : end])


def digest(body: Body, part: Part) -> str:
    """The content-hash dedup key of one part, hashed from the mapping without a copy."""
    with memoryview(body) as view, view[part.start : part.end] as data:
        return "sha256:" + hashlib.sha256(data).hexdigest()
