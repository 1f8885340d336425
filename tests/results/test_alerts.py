"""Critical alerts: over MLLP (acknowledged, audited), by a signed webhook, ahead of a hung PACS."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from pipeline.cli.outbox import Sender
from pipeline.db import session_scope
from pipeline.models import AuditEvent, Study, utcnow
from pipeline.results.destinations import parse_url, sync_env
from pipeline.settings import Settings
from pipeline.tables_results import Destination, OutboxItem, ResultObject
from tests import pacs
from tests.results.support import RedisTrap, SenderProcess, add_destination, outbox, wait_for


class MllpListener:
    """A real MLLP receiver (python-hl7's asyncio server) that records and ACKs messages."""

    def __init__(self) -> None:
        import asyncio

        self.messages: list[str] = []
        self.port = pacs.free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _serve(self) -> None:
        from hl7.mllp import start_hl7_server

        async def handle(reader: Any, writer: Any) -> None:
            try:
                while not reader.at_eof():
                    message = await reader.readmessage()
                    self.messages.append(str(message))
                    writer.writemessage(message.create_ack())
                    await writer.drain()
            except Exception:  # the client closed
                pass
            finally:
                writer.close()

        async def main() -> None:
            server = await start_hl7_server(handle, "127.0.0.1", self.port)
            self.ready.set()
            async with server:
                await server.serve_forever()

        self.loop.create_task(main())
        self.loop.run_forever()

    def stop(self) -> None:
        def cancel() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_soon(self.loop.stop)

        import asyncio

        self.loop.call_soon_threadsafe(cancel)
        self.thread.join(5)


def make_critical(factory: Any) -> Study:
    with session_scope(factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid.is_not(None))).one()
        study.triage_class, study.priority = "critical", 90.0
        session.flush()
        session.expunge(study)
        return study


def test_critical_study_alert_over_mllp_is_acknowledged(
    populated: Any, settings: Settings, database_url: str
) -> None:
    study = make_critical(populated)
    listener = MllpListener()
    try:
        add_destination(populated, settings, parse_url(f"mllp://127.0.0.1:{listener.port}"))
        sender = Sender(settings)
        result = sender.once()
        assert result["queued"]["alerts"] == 1 and result["sent"] == {"sent": 1}
        assert sender.once()["sent"] == {}  # acknowledged: never sent again
        sender.close()
    finally:
        listener.stop()
    assert len(listener.messages) == 1
    segments = {
        line.split("|")[0]: line.split("|") for line in listener.messages[0].split("\r") if line
    }
    assert segments["MSH"][8] == "ORU^R01^ORU_R01"
    assert segments["OBR"][2] == "ACC-0001" and segments["OBR"][5] == "S"
    assert "PID" not in segments and "Test^Patient" not in listener.messages[0]
    assert "critical" in listener.messages[0] and "90.0" in listener.messages[0]
    assert [i.status for i in outbox(populated)] == ["sent"]
    assert study.triage_class == "critical"
    # audited: raised and delivered, by the system (no user), with no patient data
    with populated() as session:
        alert = session.scalars(select(ResultObject).where(ResultObject.kind == "alert")).one()
        events = [
            (e.action, e.target, e.user_id, e.detail or "")
            for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            if e.action.startswith("alert_")
        ]
    assert [e[:3] for e in events] == [
        ("alert_raised", f"study:{study.id}", None),
        ("alert_sent", f"study:{study.id}", None),
    ]
    assert all(alert.uid in e[3] for e in events)
    assert "mllp destination" in events[1][3] and "attempt 1" in events[1][3]
    assert not [e for e in events if "Test^Patient" in e[3] or "PID-0001" in e[3]]


def test_critical_alert_webhook_is_signed(populated: Any, settings: Settings) -> None:
    import hashlib
    import hmac
    import http.server
    import json

    make_critical(populated)
    got: list[tuple[dict[str, str], bytes]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.headers, body))  # case-insensitive, as HTTP headers are
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = settings.with_(
            alert_destinations=f"http://127.0.0.1:{server.server_port}/hook",
            alert_webhook_secret="hook-key",
        )
        with session_scope(populated) as session:
            sync_env(session, env)  # an env destination, backdated to before the study
            for row in session.scalars(select(Destination)):
                row.created_at = utcnow() - timedelta(days=1)
        sender = Sender(env)
        assert sender.once()["sent"] == {"sent": 1}
        sender.close()
    finally:
        server.shutdown()
    headers, body = got[0]
    expected = hmac.new(b"hook-key", body, hashlib.sha256).hexdigest()
    assert headers["X-CXR-Signature"] == f"sha256={expected}"
    doc = json.loads(body)
    assert (doc["accession_number"], doc["triage_class"], doc["priority"]) == (
        "ACC-0001",
        "critical",
        90.0,
    )
    assert "Test^Patient" not in body.decode() and "PID-0001" not in body.decode()


def test_a_hung_pacs_does_not_hold_back_a_critical_alert(
    populated: Any,
    settings: Settings,
    sender_factory: Callable[[Settings], SenderProcess],
    redis_trap: RedisTrap,
) -> None:
    """The PACS accepts the connection and never answers (the sender waits out its 30 s
    timeouts); the critical alert goes out on its own loop meanwhile."""
    study = make_critical(populated)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # the kernel accepts; nobody ever reads or answers
    listener = MllpListener()
    try:
        add_destination(
            populated, settings, parse_url(f"dicom://HUNG@127.0.0.1:{hung.getsockname()[1]}")
        )
        sender = sender_factory(settings.with_(redis_url=redis_trap.url))
        wait_for(
            lambda: {r.status for r in outbox(populated)} == {"sending"},
            "the PACS rows claimed and stuck",
            60,
            every=0.1,
        )
        add_destination(populated, settings, parse_url(f"mllp://127.0.0.1:{listener.port}"))
        wait_for(lambda: listener.messages, "the alert at the MLLP listener", 25, every=0.1)
        with populated() as session:
            alert_row = (
                select(OutboxItem.status)
                .join(Destination, Destination.id == OutboxItem.destination_id)
                .where(Destination.kind == "mllp")
            )
            wait_for(
                lambda: (
                    session.scalar(alert_row.execution_options(populate_existing=True)) == "sent"
                ),
                "the ACK recorded",
                25,
                every=0.1,
            )
        by_kind = sorted((r.destination_id, r.status) for r in outbox(populated))
        assert by_kind == [(1, "sending"), (1, "sending"), (2, "sent")]  # the PACS still hangs
        sender.kill()  # rather than wait out the hung association
    finally:
        listener.stop()
        hung.close()
    assert len(listener.messages) == 1 and "ACC-0001" in listener.messages[0]
    assert study.triage_class == "critical" and redis_trap.connections == 0
