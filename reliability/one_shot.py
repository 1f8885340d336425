"""Single sends down each ingest path, answered as the protocol answers: STOW-RS, C-STORE, CLI."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom

from pipeline.settings import PACKAGE_ROOT
from reliability.netsend import post
from reliability.system import System


def dicom_only(paths: list[Path]) -> list[Path]:
    """The DICOM files of a list of studies."""
    return [p for p in paths if p.suffix == ".dcm"]


def sop_uid(path: Path) -> str:
    """A file's SOP Instance UID."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def stow(system: System, paths: list[Path]) -> tuple[int, list[int]]:
    """One STOW-RS request with these instances; (HTTP status, the failed parts' statuses)."""
    boundary = "cxr" + secrets.token_hex(12)
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + p.read_bytes()
            + b"\r\n"
            for p in paths
        )
        + f"--{boundary}--\r\n".encode()
    )
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    feed = system.accounts["feed"][2]
    status, doc = post(
        system.base_url,
        "/dicomweb/studies",
        body,
        {"Authorization": f"Bearer {feed}", "Content-Type": ctype},
    )
    failed = [
        int(item["00081197"]["Value"][0]) for item in doc.get("00081198", {}).get("Value", [])
    ]
    return status, failed


def c_store(port: int, paths: list[Path]) -> list[int]:
    """C-STORE each file on one association; the statuses (-1: the association failed)."""
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title="RELIABILITY")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
    if not assoc.is_established:
        return [-1] * len(paths)
    try:
        return [int(getattr(assoc.send_c_store(pydicom.dcmread(p)), "Status", -1)) for p in paths]
    finally:
        assoc.release()


def cli_ingest(system: System, folder: Path) -> tuple[int, dict[str, Any], str]:
    """``cxr-triage ingest --json folder`` as an operator runs it; (exit, JSON doc, stderr)."""
    assert system.settings is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(system.settings.as_env(), **system.extra_env)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "ingest", "--json", str(folder)],
        env=env,
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        doc = json.loads(lines[-1]) if len(lines) == 1 else {}
    except ValueError:
        doc = {}
    if len(lines) != 1:
        doc["_lines"] = len(lines)
    return proc.returncode, doc, proc.stderr
