"""Fetch a package tarball with the site's own npm (``npm pack``), so its .npmrc applies."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


class NpmFailed(Exception):
    """npm could not be run, or did not leave one tarball; the message says why."""


def npm_error(done: subprocess.CompletedProcess[str]) -> str:
    """npm's own summary of why it failed (with --json it prints one on stdout)."""
    try:
        error = json.loads(done.stdout)["error"]
        return f"{error.get('code') or 'error'}: {error['summary']}"
    except (ValueError, KeyError, TypeError):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return " / ".join(lines[:3]) or "no message"


def npm_pack(npm: str, spec: str, folder: Path, timeout_s: float) -> Path:
    """Run ``npm pack spec`` into ``folder``; the tarball it left there."""
    # Few, short retries: an offline `make install` should warn in seconds, not minutes. The
    # cache is used when it holds the package (the tarball is checked against the pin anyway).
    command = [
        npm,
        "pack",
        spec,
        "--pack-destination",
        str(folder),
        "--json",
        "--ignore-scripts",
        "--prefer-offline",
        "--fetch-retries=1",
        "--fetch-retry-mintimeout=1000",
        "--fetch-retry-maxtimeout=5000",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NpmFailed(f"npm pack {spec} failed: {exc}") from exc
    if done.returncode != 0:
        raise NpmFailed(f"npm pack {spec} failed ({npm_error(done)})")
    found = sorted(folder.glob("*.tgz"))
    if len(found) != 1:
        raise NpmFailed(f"npm pack left {len(found)} tarballs in {folder}, not one")
    return found[0]
