"""Unpack one folder of a tarball safely: plain files only, nothing that climbs out of it."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath


class UnsafeMember(Exception):
    """A member would land outside the target folder, or is a link or a device."""


def member_path(member: tarfile.TarInfo, subtree: PurePosixPath) -> PurePosixPath | None:
    """The member's path inside ``subtree``, None when it lies outside; UnsafeMember when hostile."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or "\\" in member.name:
        raise UnsafeMember(f"refused the archive: member {member.name!r} escapes the folder")
    if name == subtree or subtree not in name.parents:
        return None
    if not (member.isfile() or member.isdir()):
        raise UnsafeMember(f"refused the archive: {member.name!r} is a link or device")
    return name.relative_to(subtree)


def extract_subtree(tarball: Path, subtree: PurePosixPath, target: Path) -> int:
    """Unpack the tarball's ``subtree`` into ``target``, file by file; how many files."""
    root = target.resolve()
    count = 0
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar:
            relative = member_path(member, subtree)
            if relative is None:
                continue
            dest = (root / relative).resolve()
            if dest != root and root not in dest.parents:
                raise UnsafeMember(f"refused the archive: {member.name!r} escapes the folder")
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has a stream
            with source, dest.open("xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            count += 1
    return count
