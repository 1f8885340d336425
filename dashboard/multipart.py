"""Request bodies for the ingest endpoints: spooled to disk, then split into parts.

Werkzeug's form parser only knows ``multipart/form-data`` (it requires Content-Disposition on
every part), and STOW-RS sends ``multipart/related``. One small parser serves both: the body is
copied to a temporary file under a size limit (never held in memory whole), mapped, and the
parts are found by their boundary (RFC 2046). A part is a range of the mapped file, so a part
over the per-file limit can be hashed without ever being copied.
"""

from __future__ import annotations

import hashlib
import mmap
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from werkzeug.http import parse_options_header

CHUNK = 1 << 20


class MalformedBody(ValueError):
    """The body is not the multipart message its Content-Type announces; says what is wrong."""


class BodyTooLarge(Exception):
    """The body is larger than the request limit."""


@dataclass
class Part:
    headers: dict[str, str]
    start: int
    end: int
    options: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def content_type(self) -> str:
        return parse_options_header(self.headers.get("content-type", ""))[0].lower()

    @property
    def name(self) -> str | None:
        return self._disposition().get("name")

    @property
    def filename(self) -> str | None:
        return self._disposition().get("filename")

    def _disposition(self) -> dict[str, str]:
        return parse_options_header(self.headers.get("content-disposition", ""))[1]


@contextmanager
def spooled(stream: IO[bytes], limit: int) -> Iterator[mmap.mmap | bytes]:
    """The body copied to a temporary file and mapped read-only; BodyTooLarge past ``limit``."""
    with tempfile.TemporaryFile(prefix="cxr-upload-") as tmp:
        total = 0
        while block := stream.read(CHUNK):
            total += len(block)
            if total > limit:
                raise BodyTooLarge(f"the request body is over the {limit / 1e6:.0f} MB limit")
            tmp.write(block)
        tmp.flush()
        if total == 0:
            yield b""
            return
        with mmap.mmap(tmp.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def split(body: mmap.mmap | bytes, boundary: str) -> list[Part]:
    """The parts of a multipart body, as byte ranges of it."""
    if not body:
        raise MalformedBody("the request body is empty")
    delim = b"--" + boundary.encode("latin-1")
    pos = body.find(delim)
    if pos < 0:
        raise MalformedBody("the body does not contain the boundary named in Content-Type")
    parts: list[Part] = []
    while True:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return parts  # close delimiter; the epilogue is ignored
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise MalformedBody("the body ends inside a boundary line")
        head_end = body.find(b"\r\n\r\n", line_end)
        if head_end < 0:
            raise MalformedBody(f"part {len(parts) + 1} has no blank line after its headers")
        headers = _headers(bytes(body[line_end + 2 : head_end]), len(parts) + 1)
        data_end = body.find(b"\r\n" + delim, head_end + 4)
        if data_end < 0:
            raise MalformedBody(
                f"part {len(parts) + 1} has no closing boundary: the body is truncated"
            )
        parts.append(Part(headers, head_end + 4, data_end))
        pos = data_end + 2


def _headers(raw: bytes, number: int) -> dict[str, str]:
    headers = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MalformedBody(f"part {number} has a header line without a colon")
        headers[name.strip().lower()] = value.strip()
    return headers


def hash_range(body: mmap.mmap | bytes, part: Part) -> str:
    """The content-hash dedup key of one part, read from the mapping in chunks."""
    digest = hashlib.sha256()
    view = memoryview(body)
    try:
        for start in range(part.start, part.end, CHUNK):
            digest.update(view[start : min(start + CHUNK, part.end)])
    finally:
        view.release()
    return "sha256:" + digest.hexdigest()
