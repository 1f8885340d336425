"""A small tmpfs filled to the last byte, and what a full disk must not leave behind."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from sqlalchemy import exists, func, select, text

from pipeline.models import Image, Study
from reliability.system import System


class SmallDisk:
    """A tmpfs of ``size_mb`` MB, and a filler file that takes all of its free space."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path, self.size_mb = path, size_mb
        self.filler = path / "filler"
        self.mounted = False

    def mount(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={self.size_mb}m,mode=0700",
                "cxr-diskfull",
                str(self.path),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        self.mounted = True
        return self

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> int:
        """Append to the filler until the kernel says ENOSPC; return the bytes left (0)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for block in (1 << 20, 1 << 12, 1):
                chunk = b"\0" * block
                while True:
                    try:
                        if os.write(fd, chunk) < block:
                            break
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return self.free_bytes()

    def release(self) -> None:
        """Space returns: the operator deletes what filled the disk."""
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self.mounted = False


def half_written(system: System, refused_sops: set[str], spool: Path) -> list[str]:
    """What a full disk must not leave behind; each problem as a sentence."""
    assert system.factory is not None
    problems = []
    with system.factory() as session:
        orphans = session.scalar(
            select(func.count(Study.id)).where(~exists().where(Image.study_id == Study.id))
        )
        if orphans:
            problems.append(f"{orphans} studies without an image")
        if refused_sops:
            stored = session.scalar(
                select(func.count(Image.id)).where(Image.sop_uid.in_(refused_sops))
            )
            if stored:
                problems.append(f"{stored} files answered as refused were stored")
        no_preview = session.scalar(
            select(func.count(Image.id)).where(
                Image.status.in_(("queued", "processing")), Image.preview.is_(None)
            )
        )
        if no_preview:
            problems.append(f"{no_preview} queued images without their preview")
        if system.profile.database_url is None:
            check = session.execute(text("PRAGMA integrity_check")).scalar()
            if check != "ok":
                problems.append(f"SQLite integrity_check: {check}")
    # The spool is an unnamed temporary file (O_TMPFILE); a named fallback must be gone too.
    left = [p.name for p in spool.glob("cxr-upload-*")] if spool.exists() else []
    if left:
        problems.append(f"{len(left)} files left in the upload spool: {left[:3]}")
    return problems


def stored_sops(system: System, sops: set[str]) -> set[str]:
    """Of these SOP UIDs, those with an image (a STOW or ingest request cut off midway)."""
    assert system.factory is not None
    with system.factory() as session:
        return set(session.scalars(select(Image.sop_uid).where(Image.sop_uid.in_(sops))))
