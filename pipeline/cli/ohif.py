"""``cxr-triage ohif install [--tarball FILE] [--json]``: the OHIF viewer the dashboard serves.

Downloads the pinned ``@ohif/app`` build, checks its sha512 and unpacks it where the dashboard
looks (``CXR_OHIF_DIR``, else ``<data dir>/ohif/<version>``); run again, it does nothing. An
offline site copies the tarball in and passes ``--tarball`` (checked the same way).
``cxr-triage ohif status`` says whether it is there. ``--json``: one line on stdout.
Exit status: 0 installed (or already), 1 refused (checksum, archive, folder), 3 download failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.settings import Settings
from pipeline.viewer import ohif

EXIT_REFUSED = 1
EXIT_DOWNLOAD = 3


def _report(args: argparse.Namespace, doc: dict[str, Any], text: str, error: bool) -> None:
    if args.json:
        print(json.dumps(doc))
    else:
        print(text, file=sys.stderr if error else sys.stdout)


def cmd_install(args: argparse.Namespace, settings: Settings) -> int:
    target = ohif.viewer_dir(settings)
    base = {"package": ohif.PACKAGE, "version": ohif.VERSION, "path": str(target)}
    tarball = Path(args.tarball).expanduser().resolve() if args.tarball else None
    try:
        done = ohif.install(target, tarball=tarball)
    except ohif.DownloadFailed as exc:
        _report(
            args,
            {**base, "ok": False, "installed": False, "error": str(exc), "reason": "download"},
            f"cxr-triage ohif install: {exc}. The viewer is not installed; the dashboard "
            "works without it. Try again when the registry answers, or pass --tarball.",
            error=True,
        )
        return EXIT_DOWNLOAD
    except (ohif.OhifError, OSError) as exc:
        reason = "integrity" if isinstance(exc, ohif.IntegrityMismatch) else "refused"
        _report(
            args,
            {**base, "ok": False, "installed": False, "error": str(exc), "reason": reason},
            f"cxr-triage ohif install: {exc}",
            error=True,
        )
        return EXIT_REFUSED
    doc = {
        **base,
        "ok": True,
        "installed": True,
        "changed": done.changed,
        "files": done.files,
        "gzipped": done.gzipped,
        "integrity": done.integrity,
    }
    verb = "installed" if done.changed else "already installed"
    _report(
        args,
        doc,
        f"OHIF viewer {ohif.VERSION} {verb} at {target}; the dashboard serves it at /ohif/",
        error=False,
    )
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    target = ohif.viewer_dir(settings)
    present = ohif.installed(target)
    doc = {
        "package": ohif.PACKAGE,
        "version": ohif.VERSION,
        "path": str(target),
        "installed": present,
        "stamp": ohif.read_stamp(target),
    }
    text = (
        f"OHIF viewer {ohif.VERSION} is installed at {target}"
        if present
        else f"OHIF viewer {ohif.VERSION} is not installed at {target}: "
        "run `cxr-triage ohif install` (or `make install`)"
    )
    _report(args, doc, text, error=False)
    return 0 if present else 1


def register(sub: Any) -> None:
    viewer = sub.add_parser("ohif", help="the OHIF viewer the dashboard serves at /ohif/")
    cmds = viewer.add_subparsers(dest="ohif_cmd", required=True)
    inst = cmds.add_parser("install", help="download the pinned build, check it, unpack it")
    inst.add_argument("--tarball", help=f"a {ohif.PACKAGE} {ohif.VERSION} .tgz fetched beforehand")
    inst.add_argument("--json", action="store_true", help="one JSON line on stdout")
    inst.set_defaults(handler=cmd_install)
    status = cmds.add_parser("status", help="whether the viewer is installed, and where")
    status.add_argument("--json", action="store_true", help="one JSON line on stdout")
    status.set_defaults(handler=cmd_status)
