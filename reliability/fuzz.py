"""Fuzz the decoder: mutated real DICOM, JPEG and PNG bytes into ``imaging.decode_bytes``.

Any exception other than ``RejectedInput`` is a failure: a modality's garbage must become a
recorded reason, never a crash of the process that received it. So is an input that only the
decoder's catch-all stopped (``UndecodableInput``): the product survives it, but its reason is
generic, and the fuzz is here to find those too. Hypothesis drives the
mutations (flips, truncations, insertions, splices of header and body) from seeds that are
valid files, so most inputs get past the magic numbers into the parsers.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.imaging.decode import Limits, RejectedInput, UndecodableInput, decode_bytes
from reliability.corpus import SHARED_DICOM
from reliability.metrics import Row
from reliability.samples import PhiRegistry, chest_like, dicom_bytes, jpeg_bytes, png_bytes


def seeds() -> list[tuple[str, bytes]]:
    """Valid files to mutate: generated ones, plus small real DICOM from ../shared/data."""
    phi = PhiRegistry()
    out = [
        ("seed.dcm", dicom_bytes(chest_like(64, seed=1), phi.new_patient(1))),
        ("seed.jpg", jpeg_bytes(chest_like(64, seed=2))),
        ("seed.png", png_bytes(chest_like(64, seed=3))),
    ]
    for path in sorted(SHARED_DICOM.rglob("*.dcm")) if SHARED_DICOM.is_dir() else []:
        if path.stat().st_size <= 300_000:  # fast to decode many times
            out.append((path.name, path.read_bytes()))
    return out


@dataclass
class FuzzResult:
    inputs: int = 0
    decoded: int = 0
    rejected: int = 0
    unhandled: Counter[str] = field(default_factory=Counter)
    example: dict[str, bytes] = field(default_factory=dict)


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) operations: flip, truncate, insert, duplicate, zero."""
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            break
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= value or 1
        elif kind == 1:
            del buf[i:]
        elif kind == 2:
            buf[i:i] = bytes([value]) * (1 + value % 8)
        elif kind == 3:
            buf[i:i] = buf[max(0, i - 64) : i]
        else:
            buf[i : i + 4] = (value * 0x01010101).to_bytes(4, "little")
    return bytes(buf)


def run_fuzz(n: int, limits: Limits | None = None) -> FuzzResult:
    """Decode n mutated inputs (a fixed number: derandomized, no shrinking, no database)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    corpus = seeds()
    result = FuzzResult()
    limits = limits or Limits(max_bytes=8 * 1024 * 1024)
    op = st.tuples(st.integers(0, 4), st.integers(0, 1 << 20), st.integers(0, 255))

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.integers(0, len(corpus) - 1),
        st.lists(op, min_size=1, max_size=6),
        st.sampled_from([None, ".dcm", ".jpg", ".png", ""]),
    )
    def one(index: int, ops: list[tuple[int, int, int]], suffix: str | None) -> None:
        name, data = corpus[index]
        filename = name if suffix is None else "fuzz" + suffix
        sample = _mutate(data, ops)
        result.inputs += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decode_bytes(sample, filename, limits)
            result.decoded += 1
        except UndecodableInput as exc:  # survived, but no specific check knew this input
            cause = exc.__cause__ or exc
            key = f"{type(cause).__name__}: {str(cause)[:120]} (caught only by the catch-all)"
            result.unhandled[key] += 1
            result.example.setdefault(key, sample)
        except RejectedInput:
            result.rejected += 1
        except Exception as exc:  # the finding: recorded, not raised, so the count is exact
            key = f"{type(exc).__name__}: {str(exc)[:120]}"
            result.unhandled[key] += 1
            result.example.setdefault(key, sample)

    one()
    return result


def fuzz_row(n: int) -> Row:
    """The fuzz run as a table row: sent = inputs, done = decoded, failures = unhandled."""
    row = Row("decoder fuzz (hypothesis, mutated real files)", "-")
    started = time.monotonic()
    try:
        result = run_fuzz(n)
    except ImportError:
        row.failures.append("hypothesis is not installed: pip install -e '.[test]'")
        return row
    row.sent, row.done, row.rejected = result.inputs, result.decoded, result.rejected
    row.recover_s = time.monotonic() - started
    total = sum(result.unhandled.values())
    row.note = f"{total} unhandled exceptions in {result.inputs} inputs"
    row.failures += [f"{k} (x{v})" for k, v in result.unhandled.most_common(5)]
    if result.inputs < n:
        row.failures.append(f"only {result.inputs} of {n} inputs ran")
    return row


def describe(result: FuzzResult) -> dict[str, Any]:
    return {
        "inputs": result.inputs,
        "decoded": result.decoded,
        "rejected": result.rejected,
        "unhandled": dict(result.unhandled),
    }
