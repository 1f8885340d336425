"""POST /api/studies (test client) and STOW-RS (a real HTTP client against a real server)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pydicom
import pytest
from sqlalchemy import select

from bench.viewer_site import serving
from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import Image, Study
from pipeline.queue.dispatch import payload_key, redis_client
from pipeline.users import create_user, issue_token
from tests.conftest import PASSWORD, chest_like, dicom_bytes, jpeg_bytes

MB = 1024 * 1024


@pytest.fixture
def ingest_env(settings):  # type: ignore[no-untyped-def]
    """Settings with a 1 MB file limit and a 3 MB request limit; a feed and a radiologist."""
    settings = settings.with_(max_file_mb=1, max_request_mb=3)
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        tokens = {}
        for name, role in (("pacs", "feed"), ("rad", "radiologist")):
            user = create_user(session, name, PASSWORD if role == "radiologist" else None, role)
            tokens[role] = issue_token(session, user)
        session.commit()
    app = create_app({"CXR_SETTINGS": settings, "TESTING": True})
    return settings, factory, app, tokens


def _form(files: dict[str, tuple[str, bytes]], fields: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in (fields or {}).items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
        )
    for name, (filename, data) in files.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(client, token, body, ctype):  # type: ignore[no-untyped-def]
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.post("/api/studies", data=body, headers=headers)


def test_a_feed_token_uploads_and_no_one_else_can(ingest_env) -> None:
    settings, factory, app, tokens = ingest_env
    client = app.test_client()
    body, ctype = _form({"file": ("../../etc/a.dcm", dicom_bytes(chest_like(seed=21)))})
    assert _post(client, None, body, ctype).status_code == 401
    assert _post(client, tokens["radiologist"], body, ctype).status_code == 403
    # A logged-in session (cookie) is refused too: these views are exempt from CSRF.
    page = client.get("/login").get_data(as_text=True)
    csrf = page.split('name="csrf_token" value="')[1].split('"')[0]
    client.post("/login", data={"username": "rad", "password": PASSWORD, "csrf_token": csrf})
    assert _post(client, None, body, ctype).get_json()["error"].startswith("send a feed")
    with factory() as session:
        assert session.scalars(select(Study)).all() == []

    first = _post(client, tokens["feed"], body, ctype)
    assert first.status_code == 202
    doc = first.get_json()
    assert (doc["status"], doc["duplicate"], doc["reason"]) == ("queued", False, None)
    with factory() as session:
        study = session.get(Study, doc["study_id"])
        image = session.get(Image, doc["image_id"])
        assert (study.source, study.status) == ("http", "queued")
        assert image.filename == "etc_a.dcm"  # the sender's path never reaches anything
    assert redis_client(settings.redis_url).exists(payload_key(doc["image_id"])) == 1
    again = _post(client, tokens["feed"], body, ctype)
    assert again.status_code == 200
    assert (again.get_json()["study_id"], again.get_json()["duplicate"]) == (doc["study_id"], True)


def test_form_fields_give_a_jpeg_its_header(ingest_env) -> None:
    _, factory, app, tokens = ingest_env
    body, ctype = _form(
        {"file": ("x.jpg", jpeg_bytes(chest_like(seed=22)))},
        {
            "AccessionNumber": "ACC-9",
            "RequestedProcedurePriority": "stat",
            "ViewPosition": "AP",
            "Nonsense": "ignored",
        },
    )
    resp = _post(app.test_client(), tokens["feed"], body, ctype)
    assert resp.status_code == 202
    with factory() as session:
        study = session.get(Study, resp.get_json()["study_id"])
        image = session.get(Image, resp.get_json()["image_id"])
        assert (study.accession_number, study.requested_priority) == ("ACC-9", "STAT")
        assert image.view_position == "AP" and "Nonsense" not in image.meta


def test_bad_uploads_get_a_4xx_with_the_reason(ingest_env) -> None:
    _, factory, app, tokens = ingest_env
    client, feed = app.test_client(), tokens["feed"]
    corrupt = _post(client, feed, *_form({"file": ("c.dcm", b"\0" * 128 + b"DICMgarbage")}))
    assert corrupt.status_code == 422
    assert corrupt.get_json()["error"].startswith("corrupt DICOM file")
    big = dicom_bytes(chest_like(size=800, seed=23))  # 1.3 MB, over the 1 MB file limit
    oversize = _post(client, feed, *_form({"file": ("big.dcm", big)}))
    assert oversize.status_code == 413
    assert oversize.get_json()["error"] == "the file is 1.3 MB, over the 1 MB limit"
    repeat = _post(client, feed, *_form({"file": ("big.dcm", big)}))
    assert (repeat.status_code, repeat.get_json()["study_id"]) == (
        413,
        oversize.get_json()["study_id"],
    )
    body, ctype = _form({"file": ("a.dcm", dicom_bytes())})
    truncated = _post(client, feed, body[:-60], ctype)
    assert truncated.status_code == 400
    assert truncated.get_json()["error"] == (
        "malformed multipart body: part 1 has no closing boundary: the body is truncated"
    )
    assert _post(client, feed, b"{}", "application/json").status_code == 415
    no_file = _post(client, feed, *_form({}, {"AccessionNumber": "1"}))
    assert no_file.get_json()["error"] == "send exactly one file, in the form field named 'file'"
    huge = _post(client, feed, *_form({"file": ("h.dcm", b"\0" * (4 * MB))}))
    assert huge.status_code == 413 and "request body" in huge.get_json()["error"]
    with factory() as session:
        rows = session.scalars(select(Study).order_by(Study.id)).all()
    # Recorded: the corrupt file and the oversize one (once); not the refused requests.
    assert [(s.source, s.status) for s in rows] == [("http", "rejected")] * 2
    assert rows[1].reason == "the file is 1.3 MB, over the 1 MB limit"


# --------------------------------------------------------------------------- STOW-RS


@pytest.fixture
def server(ingest_env) -> Iterator[str]:
    """The dashboard on a real socket (werkzeug, threaded)."""
    with serving(ingest_env[2]) as base:
        yield base


def _stow(url: str, token: str | None, parts: list[bytes], type_: str = "application/dicom"):  # type: ignore[no-untyped-def]
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
            for p in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="{type_}"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{url}/dicomweb/studies", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read() or b"{}")


def _uid(data: bytes) -> str:
    import io

    return str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)


def test_stow_stores_some_fails_others_and_says_which(server, ingest_env) -> None:
    _, factory, _, tokens = ingest_env
    good = dicom_bytes(chest_like(seed=31))
    truncated = dicom_bytes(chest_like(seed=32))[:-3000]
    big = dicom_bytes(chest_like(size=800, seed=33))
    status, headers, doc = _stow(server, tokens["feed"], [good, truncated, big])
    assert status == 202 and headers["Content-Type"] == "application/dicom+json"
    assert [i["00081155"]["Value"][0] for i in doc["00081199"]["Value"]] == [_uid(good)]
    assert doc["00081199"]["Value"][0]["00081150"]["Value"] == ["1.2.840.10008.5.1.4.1.1.1"]
    failed = {
        i["00081155"]["Value"][0]: i["00081197"]["Value"][0] for i in doc["00081198"]["Value"]
    }
    assert failed == {_uid(truncated): 0xC000, _uid(big): 0xA700}
    warnings = headers.get_all("Warning")
    assert warnings[0].startswith('299 cxr-triage "part 2: pixel data is truncated or corrupt')
    assert warnings[1] == '299 cxr-triage "part 3: the file is 1.3 MB, over the 1 MB limit"'
    with factory() as session:
        rows = session.scalars(select(Study).order_by(Study.id)).all()
    assert [(s.source, s.status) for s in rows] == [
        ("stow", "queued"),
        ("stow", "rejected"),
        ("stow", "rejected"),
    ]

    # All stored (a duplicate counts: it is known) → 200; all failed → 409.
    status, _, doc = _stow(server, tokens["feed"], [good, dicom_bytes(chest_like(seed=34))])
    assert status == 200 and len(doc["00081199"]["Value"]) == 2 and "00081198" not in doc
    status, _, doc = _stow(server, tokens["feed"], [truncated])
    assert status == 409 and "00081199" not in doc
    with factory() as session:
        assert len(session.scalars(select(Study)).all()) == 4


def test_stow_refuses_other_roles_and_other_media_types(server, ingest_env) -> None:
    _, factory, _, tokens = ingest_env
    part = dicom_bytes()
    assert _stow(server, None, [part])[0] == 401
    assert _stow(server, tokens["radiologist"], [part])[0] == 403
    status, _, doc = _stow(server, tokens["feed"], [part], type_="application/dicom+json")
    assert status == 415 and doc["error"].startswith("only application/dicom parts")
    with factory() as session:
        assert session.scalars(select(Study)).all() == []
