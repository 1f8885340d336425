"""Precompressed siblings of a static web build: ``NAME.gz`` beside each compressible file.

The OHIF build is 74 MB of JavaScript (27 MB of it loaded to show one study) and 100 MB of
WebAssembly; gzip takes the JavaScript to a fifth. Compressing once, when the build is
installed, costs seconds; compressing per request would cost the dashboard's CPU on every cold
load. The dashboard sends ``NAME.gz`` with ``Content-Encoding: gzip`` to a browser that accepts
it, as nginx's ``gzip_static`` does (dashboard.ohif_view). Each sibling is written under a
hidden temporary name and renamed into place, so a killed run leaves no half file under a name
that is served; a file whose sibling is as new as it is skipped, so a second run does nothing.
"""

from __future__ import annotations

import gzip
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".gz"
TEXT = frozenset({".js", ".mjs", ".css", ".html", ".json", ".jsonc", ".svg", ".webapp", ".xml"})
BINARY = frozenset({".wasm", ".ico"})
MIN_BYTES = 1024  # below this the headers outweigh what gzip saves
WORTH = 0.9  # keep a sibling only when it is at most this share of the original


@dataclass(frozen=True)
class Compressed:
    files: int  # siblings written by this run
    kept: int  # files that have a sibling after it (written now or before)
    bytes_in: int  # size of the files compressed by this run
    bytes_out: int  # size of their siblings
    seconds: float


def sibling(path: Path) -> Path:
    """Where the precompressed copy of ``path`` lives."""
    return path.with_name(path.name + SUFFIX)


def compressible(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in TEXT or suffix in BINARY


def fresh_sibling(path: Path) -> Path | None:
    """The sibling of ``path`` when it exists and is not older than the file, else None."""
    gz = sibling(path)
    try:
        return gz if gz.stat().st_mtime_ns >= path.stat().st_mtime_ns else None
    except FileNotFoundError:
        return None


def precompress(root: Path) -> Compressed:
    """Write ``.gz`` siblings for every compressible file under ``root`` that lacks a fresh one."""
    t0 = time.perf_counter()
    files = kept = bytes_in = bytes_out = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or not compressible(path):
            continue
        if fresh_sibling(path) is not None:
            kept += 1
            continue
        data = path.read_bytes()
        if len(data) < MIN_BYTES:
            continue
        level = 9 if path.suffix.lower() in TEXT else 6
        packed = gzip.compress(data, compresslevel=level, mtime=0)
        if len(packed) > WORTH * len(data):
            continue
        tmp = path.with_name(f".{path.name}{SUFFIX}.tmp")
        tmp.write_bytes(packed)
        os.replace(tmp, sibling(path))
        files, kept = files + 1, kept + 1
        bytes_in, bytes_out = bytes_in + len(data), bytes_out + len(packed)
    done = Compressed(files, kept, bytes_in, bytes_out, time.perf_counter() - t0)
    if files:
        log.info(
            "precompressed %d files under %s: %.1f MB -> %.1f MB in %.1f s",
            files,
            root,
            bytes_in / 1e6,
            bytes_out / 1e6,
            done.seconds,
        )
    return done
