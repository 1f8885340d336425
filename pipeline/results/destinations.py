"""Where results and alerts go: parsing, validation, encrypted secrets, the environment's list.

Destinations live in the ``destinations`` table. An admin adds them on the console; for
compose and automation ``CXR_PACS_DESTINATIONS`` (``dicom://AE@host:port``,
``http(s)://host:port/dicom-web``) and ``CXR_ALERT_DESTINATIONS`` (``mllp://host:port``,
``http(s)://…`` webhooks) are synced into the same table by the sender (``source = env``).
A password, token or webhook key is stored encrypted with a key derived from
``CXR_SECRET_KEY`` (Fernet), is never shown back and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.settings import ConfigError, Settings
from pipeline.tables_results import Destination

KINDS = ("dicom", "dicomweb", "mllp", "webhook")
PACS_KINDS = ("dicom", "dicomweb")
ALERT_KINDS = ("mllp", "webhook")
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash


class DestinationError(ValueError):
    """A destination that cannot be used; the message says why."""


@dataclass
class Spec:
    """A destination as parsed from a URL or a console form, before it is stored."""

    kind: str
    name: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    url: str | None = None
    auth: str = "none"
    username: str | None = None
    secret: str | None = None  # plain text here; encrypted when stored
    want_sr: bool = True
    want_sc: bool = True


def _fernet(settings: Settings) -> Any:
    from cryptography.fernet import Fernet

    digest = hashlib.sha256(b"cxr-triage destinations:" + settings.effective_secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(digest.digest()))


def encrypt(settings: Settings, secret: str) -> str:
    """A secret as stored: Fernet (AES-128-CBC + HMAC) under a key from CXR_SECRET_KEY."""
    return str(_fernet(settings).encrypt(secret.encode()).decode())


def decrypt(settings: Settings, stored: str | None) -> str | None:
    """The stored secret in plain text; DestinationError if the secret key has changed."""
    if not stored:
        return None
    from cryptography.fernet import InvalidToken

    try:
        return str(_fernet(settings).decrypt(stored.encode()).decode())
    except InvalidToken:
        raise DestinationError(
            "its stored secret cannot be read (CXR_SECRET_KEY changed?): enter it again"
        ) from None


def _port(text: str | None, default: int | None = None) -> int:
    if not text:
        if default is None:
            raise DestinationError("a port is needed")
        return default
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise DestinationError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def check_ae(title: str) -> str:
    """An AE title as DICOM allows it (1-16 printable characters, no backslash)."""
    title = title.strip()
    if not _AE.match(title):
        raise DestinationError(f"AE title {title!r}: 1 to 16 printable characters, no '\\'")
    return title


def check_http(url: str) -> str:
    """An http(s) URL with a host; no credentials in it (they belong in the secret)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationError(f"{url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise DestinationError("put the user name and password in their own fields, not the URL")
    return url.strip().rstrip("/")


def parse_url(entry: str) -> Spec:
    """One ``CXR_PACS_DESTINATIONS``/``CXR_ALERT_DESTINATIONS`` entry.

    ``dicom://AE@host:port``, ``http(s)://[user:password@]host[:port]/path`` (DICOMweb, or a
    webhook in the alert list), ``mllp://host:port``. A ``#sr`` or ``#sc`` fragment limits a
    PACS entry to one kind of object.
    """
    entry = entry.strip()
    parts = urlsplit(entry)
    want = {w.strip().lower() for w in parts.fragment.split(",") if w.strip()} or {"sr", "sc"}
    if not want <= {"sr", "sc"}:
        raise DestinationError(f"{entry!r}: the fragment names sr and/or sc")
    if parts.scheme == "dicom":
        if not parts.username or not parts.hostname:
            raise DestinationError(f"{entry!r}: write dicom://AE_TITLE@host:port")
        ae = check_ae(unquote(parts.username))
        port = _port(parts.netloc.rsplit(":", 1)[1] if ":" in parts.netloc else None, 104)
        return Spec(
            "dicom",
            f"dicom://{ae}@{parts.hostname}:{port}",
            ae_title=ae,
            host=parts.hostname,
            port=port,
            want_sr="sr" in want,
            want_sc="sc" in want,
        )
    if parts.scheme == "mllp":
        if not parts.hostname:
            raise DestinationError(f"{entry!r}: write mllp://host:port")
        port = _port(str(parts.port) if parts.port else None)
        return Spec("mllp", f"mllp://{parts.hostname}:{port}", host=parts.hostname, port=port)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise DestinationError(f"{entry!r} has no host")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = f"{parts.scheme}://{netloc}{parts.path}".rstrip("/")
        spec = Spec("dicomweb", url, url=url, want_sr="sr" in want, want_sc="sc" in want)
        if parts.username:
            spec.auth, spec.username = "basic", unquote(parts.username)
            spec.secret = unquote(parts.password or "")
        return spec
    raise DestinationError(f"{entry!r}: use dicom://, http(s):// or mllp://")


def env_specs(settings: Settings) -> list[Spec]:
    """The destinations the environment names (ConfigError when one is malformed)."""
    specs = []
    try:
        for entry in _entries(settings.pacs_destinations):
            spec = parse_url(entry)
            if spec.kind not in PACS_KINDS:
                raise DestinationError(f"{entry!r}: a PACS destination is dicom:// or http(s)://")
            if spec.kind == "dicomweb" and spec.auth == "none" and settings.pacs_token:
                spec.auth, spec.secret = "bearer", settings.pacs_token
            specs.append(spec)
        for entry in _entries(settings.alert_destinations):
            spec = parse_url(entry)
            if spec.kind == "dicomweb":  # an http(s) entry in the alert list is a webhook
                spec.kind, spec.want_sr, spec.want_sc = "webhook", False, False
                spec.name = "webhook " + spec.name
                if settings.alert_webhook_secret:
                    spec.auth, spec.secret = "hmac", settings.alert_webhook_secret
            if spec.kind not in ALERT_KINDS:
                raise DestinationError(f"{entry!r}: an alert destination is mllp:// or http(s)://")
            specs.append(spec)
    except DestinationError as exc:
        raise ConfigError(f"destinations in the environment: {exc}") from exc
    return specs


def _entries(value: str | None) -> list[str]:
    return [e.strip() for e in (value or "").split(",") if e.strip()]


def apply(settings: Settings, row: Destination, spec: Spec) -> Destination:
    """Copy a spec onto a row (a new secret replaces the stored one; None keeps it)."""
    row.kind, row.name, row.ae_title = spec.kind, spec.name, spec.ae_title
    row.host, row.port, row.url, row.auth = spec.host, spec.port, spec.url, spec.auth
    row.username = spec.username
    row.want_sr, row.want_sc = spec.want_sr, spec.want_sc
    if spec.auth == "none":
        row.secret = None
    elif spec.secret:
        row.secret = encrypt(settings, spec.secret)
    return row


def sync_env(session: Session, settings: Settings) -> dict[str, int]:
    """Make the env-sourced rows match the environment; console rows are left alone."""
    specs = {s.name: s for s in env_specs(settings)}
    rows = {r.name: r for r in session.scalars(select(Destination))}
    added = disabled = 0
    for name, spec in specs.items():
        row = rows.get(name)
        if row is not None and row.source != "env":
            continue  # an admin's own row of the same name wins
        if row is None:
            row = Destination(source="env", enabled=True)
            session.add(row)
            added += 1
        apply(settings, row, spec)
        row.enabled = True
    for name, row in rows.items():
        if row.source == "env" and name not in specs and row.enabled:
            row.enabled = False
            disabled += 1
    session.flush()
    return {"added": added, "disabled": disabled}


def describe(row: Destination) -> dict[str, Any]:
    """A destination for the console and ``--json`` (no secret)."""
    if row.kind == "dicom":
        where = f"{row.ae_title}@{row.host}:{row.port}"
    elif row.kind == "mllp":
        where = f"{row.host}:{row.port}"
    else:
        where = row.url or ""
    wants = [k for k, on in (("sr", row.want_sr), ("sc", row.want_sc)) if on]
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "where": where,
        "auth": row.auth,
        "objects": ["alert"] if row.kind in ALERT_KINDS else wants,
        "enabled": row.enabled,
        "source": row.source,
    }
