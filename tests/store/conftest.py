"""Fixtures the store tests share: a small tmpfs to fill to its last byte."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability.smalldisk import SmallDisk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A mounted 4 MB tmpfs (skipped where mounting needs a root this test lacks)."""
    disk = SmallDisk(tmp_path / "disk", 4)
    try:
        disk.mount()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield disk
    finally:
        disk.unmount()
