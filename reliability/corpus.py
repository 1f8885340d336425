"""The bad-input corpus: generated files plus the malformed real DICOM in ../shared/data/dicom.

Each case names its documented outcome: the final status and a fragment of the reason recorded
on the study (docs/reliability.md has the table). Good files are mixed in, so the scenario also
shows that bad input blocks nothing else.
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage

from pipeline.settings import PACKAGE_ROOT
from reliability.samples import PhiRegistry, chest_like, dicom_bytes, jpeg_bytes, png_bytes

SHARED_DICOM = PACKAGE_ROOT.parent / "shared" / "data" / "dicom"


@dataclass(frozen=True)
class Case:
    """One corpus file: how to make it and what must happen to it."""

    kind: str
    filename: str
    make: Callable[[], bytes] | None  # None: a shared file, read from SHARED_DICOM/source
    status: str  # done | rejected | skipped
    reason: str = ""  # a fragment of the recorded reason ("" for done)
    source: str = ""


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A 60 kB PNG whose header claims 3.6 gigapixels (a decompression bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # Enough zero rows to decompress to far more than the file's size, never all of it.
    idat = zlib.compress(b"\0" * (width + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(chest_like(64)).save(buf, format="GIF")
    return buf.getvalue()


def colour_jpeg() -> bytes:
    rgb = PILImage.new("RGB", (128, 128))
    rgb.paste((200, 30, 30), (0, 0, 64, 128))
    rgb.paste((30, 30, 200), (64, 0, 128, 128))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def cases(phi: PhiRegistry, seed: int = 900_000) -> list[Case]:
    """The corpus; seed keeps generated images distinct from the scenarios' studies."""
    p = phi.new_patient
    numbers = itertools.count(seed + 10)

    def dcm(**kw: object) -> Callable[[], bytes]:
        n = next(numbers)
        return lambda: dicom_bytes(chest_like(96, seed=n), p(n), **kw)  # type: ignore[arg-type]

    good = dicom_bytes(chest_like(96, seed=seed), p(seed))
    invalid_chars = {
        0x00100010: ("PN", b"ZZTEST^PHI^" + phi.run_tag.encode() + b"\xff\xfe\x01BAD"),
        0x00080050: ("SH", b"ACC\x00\x1b[31m"),
    }
    return [
        Case("good DICOM", "good.dcm", lambda: good, "done"),
        Case("good PNG", "good.png", lambda: png_bytes(chest_like(96, seed=seed + 1)), "done"),
        Case("zero-byte file", "empty.dcm", lambda: b"", "rejected", "the file is empty"),
        Case(
            "truncated DICOM (pixel data cut)",
            "truncated.dcm",
            lambda: good[:-2000],
            "rejected",
            "truncated",
        ),
        Case(
            "truncated JPEG",
            "truncated.jpg",
            lambda: jpeg_bytes(chest_like(160, seed=seed + 2))[:600],
            "rejected",
            "JPEG",
        ),
        Case(
            "header only DICOM",
            "header-only.dcm",
            dcm(pixel_data=False),
            "rejected",
            "no pixel data",
        ),
        Case(
            "decompression bomb PNG (100 Mpx header)",
            "bomb.png",
            lambda: png_bomb(10_000, 10_000),
            "rejected",
            "pixels, over the",
        ),
        Case(
            "decompression bomb PNG (3.6 Gpx header)",
            "bomb-huge.png",
            png_bomb,
            "rejected",
            "pixel limit (a decompression bomb)",
        ),
        Case(
            "huge dimensions in a DICOM header",
            "huge.dcm",
            dcm(rows_cols=(60000, 60000)),
            "rejected",
            "pixels, over the",
        ),
        Case(
            "wrong magic: PNG bytes named .dcm",
            "wrong-magic.dcm",
            lambda: png_bytes(chest_like(96, seed=seed + 3)),
            "rejected",
            "not a DICOM file",
        ),
        Case(
            "wrong magic: GIF named .jpg",
            "gif.jpg",
            gif_bytes,
            "rejected",
            "unsupported image format GIF",
        ),
        Case(
            "non-image: text named .png",
            "notes.png",
            lambda: b"hello, not an image\n" * 40,
            "rejected",
            "not a readable",
        ),
        Case("multi-frame DICOM", "multi.dcm", dcm(frames=3), "rejected", "multi-frame"),
        Case("colour DICOM (RGB)", "rgb.dcm", dcm(samples=3), "rejected", "colour image"),
        Case("colour JPEG", "colour.jpg", colour_jpeg, "rejected", "colour image"),
        Case(
            "non-radiograph modality (CT)",
            "ct.dcm",
            dcm(modality="CT"),
            "rejected",
            "modality CT is not accepted",
        ),
        Case(
            "invalid characters in DICOM tags",
            "bad-chars.dcm",
            lambda: dicom_bytes(
                chest_like(96, seed=seed + 4), p(seed + 4), raw_elements=invalid_chars
            ),
            "done",
        ),
        Case(
            "shell and unicode characters in a file name",
            "x; rm -rf ~ $(id) ü.png",
            lambda: png_bytes(chest_like(96, seed=seed + 5)),
            "done",
        ),
        Case(
            "oversized file (sparse, over CXR_MAX_FILE_MB)",
            "oversized.dcm",
            None,
            "rejected",
            "MB limit",
            source="<sparse>",
        ),
        *shared_cases(),
    ]


def shared_cases() -> list[Case]:
    """The malformed real files of ../shared/data/dicom (see its manifest.csv)."""
    if not SHARED_DICOM.is_dir():
        return []
    rows = [
        ("no file meta, RT plan, no pixels", "malformed/ExplVR_LitEndNoMeta.dcm", "not an image"),
        ("pixel data truncated (MR)", "malformed/MR_truncated.dcm", "modality MR is not accepted"),
        ("invalid IS/DS values (RT dose)", "malformed/badVR.dcm", "not an image"),
        ("no file meta information", "malformed/no_meta.dcm", "not a DICOM file"),
        ("JPEG with a broken header", "cr_rg2_hip/RG2_JPLY_bad_header.dcm", "cannot be decoded"),
        ("CR header without pixel data", "tiny_cr/chrJapMulti.dcm", "no pixel data"),
    ]
    return [
        Case(f"shared: {kind}", Path(src).name, None, "rejected", reason, source=src)
        for kind, src, reason in rows
        if (SHARED_DICOM / src).exists()
    ]


def write_corpus(folder: Path, corpus: list[Case], max_bytes: int) -> dict[Path, Case]:
    """Write every case under folder (one subfolder each: names may repeat); path -> case."""
    out = {}
    for n, case in enumerate(corpus):
        sub = folder / f"{n:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / case.filename
        if case.source == "<sparse>":
            with open(path, "wb") as fh:
                fh.truncate(max_bytes + 1024 * 1024)  # no disk blocks, just a size
        elif case.make is None:
            path.write_bytes((SHARED_DICOM / case.source).read_bytes())
        else:
            path.write_bytes(case.make())
        out[path] = case
    return out
