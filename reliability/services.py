"""The system's parts as processes: children with logs of their own, Redis, /healthz waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.service.redis_server import EmbeddedRedis
from pipeline.settings import PACKAGE_ROOT

COMPOSE_FILE = PACKAGE_ROOT / "docker-compose.yml"


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compose_redis_flags(compose_file: Path = COMPOSE_FILE) -> list[str]:
    """The flags docker-compose.yml gives redis-server (its JSON-style ``command`` list)."""
    lines = compose_file.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "redis:")
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if stripped.startswith("command:"):
            command = json.loads(stripped.split(":", 1)[1])
            if command[0] != "redis-server":
                raise ValueError(f"unexpected redis command in {compose_file}: {command}")
            return [str(flag) for flag in command[1:]]
    raise ValueError(f"no redis command in {compose_file}")


class ComposeRedis(EmbeddedRedis):
    """The same redis-server binary with the production compose file's flags (AOF everysec)."""

    def command(self) -> list[str]:
        # The embedded command line, the compose file's flags last: where they overlap, they win.
        return [*super().command(), *compose_redis_flags()]


class Service:
    """A child process with its own process group and an append-only log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path):
        self.name, self.command, self.env, self.log_path = name, command, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PACKAGE_ROOT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean-up, no acknowledgements."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Profile:
    """A configuration of the system: which database and which Redis flags."""

    name: str
    database_url: str | None = None  # None: SQLite under the run directory
    redis: str = "embedded"  # embedded | compose


def wait_healthz(
    base_url: str, timeout: float, what: str, check: Callable[[], None] | None = None
) -> None:
    """Poll ``/healthz`` until it answers 200; ``check`` may raise first (a child that exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(what)
