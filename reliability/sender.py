"""Send files through the CLI ingest path (``ingest_paths`` with a sink), as a modality would.

A sender that cannot reach the database retries the same chunk: de-duplication makes a repeat
harmless (an already stored file comes back as a duplicate of its existing image), which is
exactly what a DICOM sender or a folder watcher does after an error.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pipeline.classifier.weights import describe_weights
from pipeline.ingest.accept import Enqueuer, IngestReport, ingest_paths
from pipeline.ingest.intake import limits_of
from pipeline.queue.connections import open_queue
from pipeline.store.instances import InstanceStore
from reliability.system import System

log = logging.getLogger(__name__)


class CliSender:
    """Ingest files in chunks from a background thread; remember each file's image id."""

    def __init__(
        self,
        system: System,
        paths: list[Path],
        chunk: int = 16,
        give_up_after_s: float = 120.0,
        pause_s: float = 0.0,
    ) -> None:
        self.system, self.paths, self.chunk = system, paths, chunk
        self.give_up_after_s, self.pause_s = give_up_after_s, pause_s
        self.image_ids: dict[Path, int] = {}
        self.retries = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CliSender:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def _ingest_chunk(self, chunk: list[Path]) -> IngestReport:
        settings, factory = self.system.settings, self.system.factory
        assert settings is not None and factory is not None and settings.redis_url
        model = describe_weights(settings)
        size, preprocess = model["input_size"], model["preprocess"]
        client, dispatcher = open_queue(settings.redis_url)
        sink = Enqueuer(
            factory, client, dispatcher, size, settings.payload_ttl_s, preprocess=preprocess
        )
        try:
            return ingest_paths(
                factory,
                chunk,
                limits_of(settings),
                source="cli",
                sink=sink,
                store=InstanceStore.of(settings),
            )
        finally:
            dispatcher.close()
            client.close()

    def _run(self) -> None:
        for start in range(0, len(self.paths), self.chunk):
            chunk = self.paths[start : start + self.chunk]
            deadline = time.monotonic() + self.give_up_after_s
            while True:
                try:
                    report = self._ingest_chunk(chunk)
                    break
                except Exception as exc:  # the database is unreachable: retry the chunk
                    self.retries += 1
                    if time.monotonic() > deadline:
                        self.errors.append(f"gave up on a chunk: {type(exc).__name__}")
                        report = None
                        break
                    time.sleep(0.5)
            if report is not None:
                for item in report.items:
                    if item.image_id is not None:
                        self.image_ids[Path(item.path)] = item.image_id
            if self.pause_s:
                time.sleep(self.pause_s)
