"""Settings read from ``CXR_*`` environment variables.

Every default is for development on one machine: SQLite and an embedded Redis under the data dir.
Production sets at least ``CXR_DATABASE_URL``, ``CXR_REDIS_URL`` and ``CXR_SECRET_KEY``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = PACKAGE_ROOT / "weights" / "cxr-resnet18.pt"
DEV_SECRET_KEY = "dev-only-insecure-secret-key"


class ConfigError(Exception):
    """A setting is missing or invalid."""


def _maybe(env: dict[str, str], name: str) -> str | None:
    value = env.get(f"CXR_{name}")
    return value if value not in (None, "") else None


def _as_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Runtime configuration of every cxr-triage process."""

    data_dir: Path = field(default_factory=lambda: Path("var").resolve())
    database_url: str | None = None
    redis_url: str | None = None
    weights: Path | None = None
    device: str = "auto"
    batch_size: int = 16
    batch_wait_ms: int = 200
    port: int = 8000
    host: str = "127.0.0.1"
    secret_key: str | None = None
    production: bool = False
    max_file_mb: int = 64
    max_pixels: int = 40_000_000
    modalities: tuple[str, ...] = ("CR", "DX")
    stuck_after_s: int = 600
    # A worker whose batch has run this long is hung: its claimed images are re-sent.
    hung_after_s: int = 30
    max_attempts: int = 3
    payload_ttl_s: int = 7 * 24 * 3600
    torch_threads: int = 0
    # How often a worker looks at the model registry (pipeline.classifier.registry) between batches.
    registry_check_s: float = 5.0
    # Where a CPU worker's forward pass runs (pipeline.classifier.runtimes): auto = the runtime the bench
    # measured best on this CPU for these weights, else eager PyTorch.
    runtime: str = "auto"
    # Inference worker processes; 0: one per core on a CPU (up to 8), one on a GPU.
    worker_processes: int = 0
    # Sources: a watched folder, a DICOM listener (port 0: off), the HTTP body limit.
    watch_dir: Path | None = None
    watch_settle_ms: int = 2000
    dicom_port: int = 0
    dicom_ae_title: str = "CXRTRIAGE"
    dicom_allowed_aes: tuple[str, ...] = ()
    # Pull from a PACS that cannot route (``dicom://AE@host:port``; unset: off): every
    # ``pull_every_s`` seconds, the studies of the last ``pull_since`` (30m, 12h, 2d, 1w).
    pull_from: str | None = None
    pull_every_s: int = 300
    pull_since: str = "1d"
    # Results back to the hospital (pipeline.results.outbox): PACS destinations
    # (``dicom://AE@host:port``, ``http(s)://host:port/dicom-web``, comma-separated; a bearer
    # token for the DICOMweb ones) and critical-alert receivers (``mllp://host:port``,
    # ``http(s)://`` webhooks signed with the secret). The admin console adds more.
    pacs_destinations: str | None = None
    pacs_token: str | None = None
    alert_destinations: str | None = None
    alert_webhook_secret: str | None = None
    # Seconds a sender's claim on outbox rows lasts unless renewed (it renews while it
    # works): after a sender is killed, its rows are sent again this long after.
    outbox_lease_s: int = 120
    max_request_mb: int = 512
    # The OHIF viewer at /ohif/ (pipeline.viewer.ohif, dashboard.ohif_view): the folder holding its
    # prebuilt app, a path (unset: <data dir>/ohif/<version>, where `cxr-triage ohif install`
    # puts it); and the DICOMweb root it reads studies from (unset: this dashboard's /dicomweb,
    # the session cookie authenticating; an http(s) URL: a site's own PACS, whose origin the
    # viewer's Content-Security-Policy then allows).
    ohif_dir: str | None = None
    viewer_dicomweb_url: str | None = None
    # The instance store (pipeline.store.instances): every accepted DICOM instance as received, under
    # ``store_dir`` (default: data_dir/instances). Read studies older than the retention are
    # expired; past the size limit the oldest read studies go first, and once only unread
    # studies remain new studies are refused with that reason. Unread studies are never expired.
    store_dir: Path | None = None
    store_retention_days: int = 30
    store_max_gb: float = 200.0
    store_expire_every_s: int = 600

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from the environment, then apply explicit overrides."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        converters: dict[str, Any] = {
            "data_dir": lambda v: Path(v).expanduser().resolve(),
            "weights": lambda v: Path(v).expanduser().resolve(),
            "production": _as_bool,
            "modalities": lambda v: tuple(m.strip().upper() for m in v.split(",") if m.strip()),
            "watch_dir": lambda v: Path(v).expanduser().resolve(),
            "store_dir": lambda v: Path(v).expanduser().resolve(),
            "dicom_allowed_aes": lambda v: tuple(a.strip() for a in v.split(",") if a.strip()),
        }
        for f in fields(cls):
            raw = _maybe(env, f.name.upper())
            if raw is None:
                continue
            convert = converters.get(f.name)
            if convert is None:
                convert = (
                    int if f.type in ("int", int) else float if f.type in ("float", float) else str
                )
            try:
                values[f.name] = convert(raw)
            except ValueError as exc:
                raise ConfigError(f"CXR_{f.name.upper()}={raw!r} is not valid: {exc}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def as_env(self) -> dict[str, str]:
        """These settings as ``CXR_*`` variables, so a child process reads back the same values."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "1" if value else "0"
            elif isinstance(value, tuple):
                text = ",".join(value)
            else:
                text = str(value)
            env[f"CXR_{f.name.upper()}"] = text
        return env

    def with_(self, **changes: Any) -> Settings:
        """Return a copy with some fields changed."""
        return replace(self, **changes)

    def validate(self) -> None:
        """Refuse configurations that cannot work."""
        if self.batch_size < 1:
            raise ConfigError("CXR_BATCH_SIZE must be at least 1")
        if self.worker_processes < 0:
            raise ConfigError("CXR_WORKER_PROCESSES must not be negative")
        if self.batch_wait_ms < 0:
            raise ConfigError("CXR_BATCH_WAIT_MS must not be negative")
        if self.pull_from is not None:
            parse_node(self.pull_from)
            parse_since(self.pull_since)
            if self.pull_every_s < 10:
                raise ConfigError("CXR_PULL_EVERY_S must be at least 10 seconds")
        if self.outbox_lease_s < 2:
            raise ConfigError("CXR_OUTBOX_LEASE_S must be at least 2 seconds")
        if self.store_retention_days < 1:
            raise ConfigError("CXR_STORE_RETENTION_DAYS must be at least 1")
        if self.store_max_gb <= 0:
            raise ConfigError("CXR_STORE_MAX_GB must be positive")
        if self.production and not self.secret_key:
            raise ConfigError("CXR_SECRET_KEY must be set when CXR_PRODUCTION=1")

    @property
    def db_url(self) -> str:
        """The database URL, SQLite under the data dir by default."""
        return self.database_url or f"sqlite:///{self.data_dir / 'cxr-triage.db'}"

    @property
    def effective_secret_key(self) -> str:
        """The configured secret key, or a development key when not in production."""
        return self.secret_key or DEV_SECRET_KEY

    @property
    def weights_path(self) -> Path:
        """The weights file: configured, else shipped, else a generated untrained stand-in."""
        if self.weights is not None:
            return self.weights
        if SHIPPED_WEIGHTS.exists():
            return SHIPPED_WEIGHTS
        return self.data_dir / "weights" / "untrained-resnet18.pt"

    @property
    def visibility_timeout_s(self) -> int:
        """Redis's (kombu's) visibility timeout: an unacknowledged message returns to its queue
        after this long. Never shorter than the stuck timeout, so kombu does not hand out
        again what the reconciler still counts as in flight (600 s with the defaults)."""
        return max(300, self.stuck_after_s)

    @property
    def instance_dir(self) -> Path:
        """The instance store's root."""
        return self.store_dir or self.data_dir / "instances"

    @property
    def runtime_file(self) -> Path:
        """Where a running ``cxr-triage run`` records its Redis URL for other commands."""
        return self.data_dir / "runtime.json"


# Values of the PACS-pull knobs (CXR_PULL_FROM, CXR_PULL_SINCE), parsed with a clear error.
NODE = re.compile(r"^dicom://(?P<aet>[^@/\s]{1,16})@(?P<host>[^:/\s]+):(?P<port>\d{1,5})/?$")


@dataclass(frozen=True)
class DicomNode:
    """A remote DICOM application entity."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"dicom://{self.ae_title}@{self.host}:{self.port}"


def parse_node(text: str) -> DicomNode:
    """``dicom://AE_TITLE@host:port`` -> DicomNode, or a ConfigError saying what is wrong."""
    m = NODE.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"{text!r} is not a DICOM node: write dicom://AE_TITLE@host:port")
    return DicomNode(m["aet"], m["host"], int(m["port"]))


SINCE = re.compile(r"^(?P<n>\d+)(?P<unit>[mhdw])$")


def parse_since(text: str, now: datetime | None = None) -> date:
    """``30m``, ``12h``, ``2d``, ``1w`` back from now, or a date ``YYYYMMDD``/``YYYY-MM-DD``."""
    now = now or datetime.now(UTC)
    text = text.strip().lower()
    if m := SINCE.match(text):
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m["unit"]]
        return (now - timedelta(**{unit: int(m["n"])})).date()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ConfigError(f"--since {text!r}: write a duration (30m, 12h, 2d, 1w) or a date YYYYMMDD")
