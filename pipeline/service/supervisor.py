"""Child processes of ``cxr-triage run``: start, restart when they die, stop them all."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.classifier.weights import ensure_weights
from pipeline.service.lifetime import die_with_parent
from pipeline.settings import Settings

log = logging.getLogger(__name__)

MAX_CPU_WORKERS = 8


@dataclass(frozen=True)
class WorkerLayout:
    """How the inference work is spread over processes on this machine."""

    device: str  # "cpu", or the accelerator ("cuda", "cuda:1")
    processes: int
    threads: int  # torch CPU threads in each process; 0: torch's default


def inference_layout(settings: Settings) -> WorkerLayout:
    """The inference processes to run here and the CPU threads of each.

    On a CPU: one process per core with one thread each (up to 8 processes; beyond 8 cores
    each gets ``cores // 8`` threads). Independent processes each run whole batches, so a core
    that ingest or the database borrows for a moment slows one batch. One process with a
    thread per core instead waits at every operator for its slowest thread, and loses far
    more (docs/worker.md has the measurements). On a GPU: one process, which keeps it fed.
    ``CXR_WORKER_PROCESSES`` and ``CXR_TORCH_THREADS`` override either number.
    """
    device = settings.device
    if device == "auto":
        import torch  # only here: the supervisor does not need torch otherwise

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        return WorkerLayout(device, settings.worker_processes or 1, settings.torch_threads)
    cores = len(os.sched_getaffinity(0))
    processes = settings.worker_processes or min(cores, MAX_CPU_WORKERS)
    threads = settings.torch_threads or max(1, cores // processes)
    return WorkerLayout(device, processes, threads)


def worker_children(
    settings: Settings, env: dict[str, str], name: str = "cxr-worker"
) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, environment) of each inference worker process of the layout."""
    layout = inference_layout(settings)
    child_env = {**env, "CXR_DEVICE": layout.device, "CXR_TORCH_THREADS": str(layout.threads)}
    if layout.processes == 1:
        return [("worker", worker_command(settings, name), child_env)]
    return [
        (f"worker-{k}", worker_command(settings, f"{name}-{k}"), child_env)
        for k in range(layout.processes)
    ]


def worker_command(settings: Settings, name: str = "cxr-worker") -> list[str]:
    """The Celery inference worker: one process, the model loaded once, live lane first."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app:app",
        "worker",
        "--pool",
        "solo",
        "--queues",
        "cxr.live,cxr.bulk",
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


def worker_nodename(command: list[str]) -> str | None:
    """The Celery name a worker command runs under (what it records on the images it claims).

    Celery expands ``%h`` to ``socket.gethostname()``; None for a command that is no worker.
    """
    if "celery" not in command or "--hostname" not in command:
        return None
    return command[command.index("--hostname") + 1].replace("%h", socket.gethostname())


def dashboard_command(settings: Settings) -> list[str]:
    """The dashboard under gunicorn with a few threads."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        "1",
        "--threads",
        "4",
        "--bind",
        f"{settings.host}:{settings.port}",
        "--access-logfile",
        "-",
        "--access-logformat",
        '%(h)s "%(m)s %(U)s" %(s)s %(L)ss [request %({x-request-id}o)s]',
        "dashboard:create_app()",
    ]


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    # Where the child's stdout and stderr go; None: the supervisor's stderr. Never its stdout,
    # which belongs to the command's own output (one line of JSON under --json).
    log_path: Path | None = None

    def start(self) -> None:
        # Own process group: Ctrl-C reaches the supervisor only, which stops children in order.
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=2 if out is None else out,
                stderr=None if out is None else subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # killed by the kernel when the supervisor dies
            )
        finally:
            if out is not None:
                out.close()
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@dataclass
class Supervisor:
    children: list[Child] = field(default_factory=list)
    # Called every loop iteration: keep non-child services (the embedded Redis) alive.
    checks: list[Callable[[], object]] = field(default_factory=list)
    stopping: bool = False
    # Children's output goes to this file when set, else to the supervisor's stderr.
    log_path: Path | None = None
    # Told the pids of the system's processes whenever they change (the run lock records them,
    # so that a run after this one died can stop any it left behind).
    on_pids: Callable[[list[int]], object] | None = None
    extra_pids: list[Callable[[], int | None]] = field(default_factory=list)
    # Called with a child found dead, before it is restarted: re-send what a worker held.
    on_exit: Callable[[Child], object] | None = None
    _reported: list[int] = field(default_factory=list, repr=False)

    def report_pids(self) -> None:
        """Tell on_pids the live processes, when they changed since the last report."""
        if self.on_pids is None:
            return
        pids = [c.process.pid for c in self.children if c.process is not None and c.alive()]
        pids += [pid for extra in self.extra_pids if (pid := extra()) is not None]
        if sorted(pids) != self._reported:
            self._reported = sorted(pids)
            self.on_pids(self._reported)

    def add(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        child = Child(name, command, env, log_path=self.log_path)
        self.children.append(child)
        return child

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        self.stopping = True

    def _restart(self, child: Child) -> None:
        code = child.process.returncode if child.process else None
        log.warning("%s exited with %s; restarting it", child.name, code)
        if self.on_exit is not None:
            # Before the restart: the new process claims nothing under the name until then.
            try:
                self.on_exit(child)
            except Exception:
                log.exception(
                    "re-sending what %s held failed; the heartbeat check retries", child.name
                )
        # Back off when a child keeps dying at start (bad config, port taken).
        if time.monotonic() - child.started_at < 5:
            time.sleep(2)
        child.restarts += 1
        child.start()

    def run(
        self,
        tick: Callable[[], object] | None = None,
        tick_every: float = 60.0,
        ticks: Sequence[tuple[float, Callable[[], object]]] = (),
    ) -> None:
        """Start every child and keep them running until SIGINT or SIGTERM.

        ``tick`` runs every ``tick_every`` seconds, and each of ``ticks`` (every, function)
        on its own period; a tick that raises is logged and tried again next period.
        """
        periodic = [*([(tick_every, tick)] if tick is not None else []), *ticks]
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                child.start()
            last = [0.0] * len(periodic)
            while not self.stopping:
                for child in self.children:
                    if not child.alive() and not self.stopping:
                        self._restart(child)
                for check in self.checks:
                    if not self.stopping:
                        check()
                self.report_pids()
                for n, (every, fn) in enumerate(periodic):
                    if time.monotonic() - last[n] >= every:
                        last[n] = time.monotonic()
                        try:
                            fn()
                        except Exception:
                            log.exception("periodic reconcile failed; will retry")
                time.sleep(0.5)
        finally:
            self.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_all(self) -> None:
        """Stop children in reverse start order."""
        for child in reversed(self.children):
            child.stop()


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """The environment of a child process: it resolves nothing itself (same data dir, database,
    Redis and weights as its parent)."""
    resolved = settings.with_(redis_url=redis_url, weights=ensure_weights(settings))
    return {**os.environ, **resolved.as_env(), "PYTHONUNBUFFERED": "1"}
