"""Worklist order, filters, search, pagination and neighbours: one query behind the page, the
API and the CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import re
import urllib.parse
import urllib.request
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from bench.viewer_site import serving
from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import Review, Study
from pipeline.triage import policy
from pipeline.triage.filters import FilterError, WorklistFilter
from pipeline.triage.studies import format_wait
from pipeline.triage.worklist import neighbour_ids, worklist_count, worklist_query
from pipeline.users import create_user
from tests.conftest import PASSWORD
from tests.web import login

T = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
# id: (priority, triage class, status, received at, accession, patient id)
ROWS = {
    1: (90.0, "critical", "done", T.replace(minute=5), "ACC-100", "P-1"),
    2: (90.0, "critical", "done", T.replace(minute=1), "ACC-101", "P-2"),
    3: (10.0, "normal", "done", datetime(2026, 11, 19, 23, 30, tzinfo=UTC), "XACC-1", "P-3"),
    4: (60.0, "urgent", "done", T.replace(minute=2), "B-7", "ACC-1"),
    5: (None, None, "rejected", T.replace(minute=3), None, None),
    6: (None, None, "queued", T.replace(hour=7, minute=59), None, None),
    7: (30.0, "routine", "done", datetime(2026, 11, 21, 0, 10, tzinfo=UTC), "ACC_1", "P%"),
}
ORDER = [2, 1, 4, 7, 3, 6, 5]  # priority desc, then arrival asc; unscored last
REVIEWED = {1, 3}
THRESHOLDS = {"routine": 0.2, "urgent": 0.6, "critical": 0.8}


@pytest.fixture
def worklist_db(database_url: str):  # type: ignore[no-untyped-def]
    upgrade(database_url)
    factory = make_session_factory(make_engine(database_url))
    with factory() as session:
        user = create_user(session, "rad", PASSWORD, "radiologist")
        for sid, (prio, cls, status, at, acc, pid) in ROWS.items():
            session.add(
                Study(
                    id=sid,
                    priority=prio,
                    triage_class=cls,
                    status=status,
                    received_at=at,
                    accession_number=acc,
                    patient_id=pid,
                )
            )
        session.flush()
        session.add_all(Review(study_id=s, user_id=user.id, action="read") for s in REVIEWED)
        # These studies waited weeks: under a maximum wait they would be read oldest first
        # (tests/triage/test_ordering.py). Here the order under test is priority's alone.
        policy.save(
            session,
            {**policy.Policy().body(), "max_wait_h": 0},
            user.id,
            "priority alone",
            THRESHOLDS,
        )
        session.commit()
    return factory


def ids(factory, **args: str) -> list[int]:  # type: ignore[no-untyped-def]
    with factory() as session:
        return [
            s.id for s in session.scalars(worklist_query(filters=WorklistFilter.from_args(args)))
        ]


CASES = [
    ({}, ORDER),
    ({"triage": "critical"}, [2, 1]),
    ({"triage": "critical,normal"}, [2, 1, 3]),
    ({"triage": "none"}, [6, 5]),
    ({"status": "rejected,queued"}, [6, 5]),
    ({"reviewed": "yes"}, [1, 3]),
    ({"reviewed": "no"}, [2, 4, 7, 6, 5]),
    ({"date_from": "2026-11-20", "date_to": "2026-11-20"}, [2, 1, 4, 6, 5]),
    ({"date_from": "2026-11-21"}, [7]),
    ({"date_to": "2026-11-19"}, [3]),
    ({"q": "ACC-10"}, [2, 1]),  # accession prefix
    ({"q": "ACC-1"}, [2, 1, 4]),  # accession prefix or patient id exact
    ({"q": "ACC-101"}, [2]),  # exact
    ({"q": "P-3"}, [3]),
    ({"q": "ACC_"}, [7]),  # "_" is a character, not a LIKE wildcard
    ({"q": "P%"}, [7]),  # "%" likewise
    ({"q": "CC"}, []),  # no substring matches: prefix only
    ({"triage": "critical", "reviewed": "no"}, [2]),
]


def test_filters_select_and_keep_the_order(worklist_db) -> None:  # type: ignore[no-untyped-def]
    for args, expected in CASES:
        assert ids(worklist_db, **args) == expected, args
        with worklist_db() as session:
            assert worklist_count(session, WorklistFilter.from_args(args)) == len(expected), args


def test_pagination_and_neighbours_respect_filters(worklist_db) -> None:  # type: ignore[no-untyped-def]
    with worklist_db() as session:
        page2 = [s.id for s in session.scalars(worklist_query(3, 3))]
        assert page2 == ORDER[3:6]
        study = {s.id: s for s in session.scalars(worklist_query())}
        assert neighbour_ids(session, study[4]) == (1, 7)
        assert neighbour_ids(session, study[2]) == (None, 1)
        assert neighbour_ids(session, study[1]) == (2, 4)  # tie on priority: arrival decides
        assert neighbour_ids(session, study[6]) == (3, 5)  # unscored come last
        assert neighbour_ids(session, study[5]) == (6, None)
        unread = WorklistFilter.from_args({"reviewed": "no"})
        assert neighbour_ids(session, study[4], unread) == (2, 7)
        critical = WorklistFilter.from_args({"triage": "critical"})
        assert neighbour_ids(session, study[1], critical) == (2, None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"status": "bogus"}, "unknown status 'bogus'"),
        ({"triage": "high"}, "unknown triage 'high'"),
        ({"reviewed": "maybe"}, "reviewed must be yes or no"),
        ({"date_from": "yesterday"}, "date_from must be a date"),
        ({"date_from": "2026-11-21", "date_to": "2026-11-20"}, "date_from is after date_to"),
        ({"q": "x" * 65}, "longer than 64"),
    ],
)
def test_bad_filters_say_why(args, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FilterError, match=re.escape(message)):
        WorklistFilter.from_args(args)


def test_search_uses_the_indexes(worklist_db, database_url) -> None:  # type: ignore[no-untyped-def]
    query = worklist_query(filters=WorklistFilter.from_args({"q": "ACC-1"}))
    engine = worklist_db.kw["bind"]
    with engine.connect() as conn:
        compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
        if database_url.startswith("sqlite"):
            plan = " ".join(str(r) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))
        else:
            conn.execute(text("SET enable_seqscan = off"))  # 7 rows: force the planner's hand
            plan = " ".join(r[0] for r in conn.execute(text(f"EXPLAIN {compiled}")))
    assert "ix_studies_accession_number" in plan and "ix_studies_patient_id" in plan, plan


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (30, "< 1 min"),
        (60, "1 min"),
        (45 * 60, "45 min"),
        (3 * 3600 + 12 * 60 + 5, "3 h 12 min"),
        (26 * 3600, "1 d 2 h"),
    ],
)
def test_waiting_time_in_words(seconds, words) -> None:  # type: ignore[no-untyped-def]
    assert format_wait(seconds) == words


@pytest.fixture
def app(settings, worklist_db, database_url):  # type: ignore[no-untyped-def]
    return create_app({"CXR_SETTINGS": settings.with_(database_url=database_url), "TESTING": True})


def test_api_and_page_share_the_filters(app, worklist_db) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    assert client.get("/api/worklist?triage=critical").status_code == 401
    login(client)
    doc = client.get("/api/worklist?triage=critical,urgent&reviewed=no").get_json()
    assert [s["id"] for s in doc["studies"]] == [2, 4]
    assert doc["total"] == 2 and [s["reviewed"] for s in doc["studies"]] == [False, False]
    paged = client.get("/api/worklist?limit=2&offset=2").get_json()
    assert [s["id"] for s in paged["studies"]] == ORDER[2:4] and paged["total"] == len(ORDER)
    bad = client.get("/api/worklist?date_from=11/20/2026")
    assert bad.status_code == 400 and "date_from must be a date" in bad.get_json()["error"]
    html = client.get("/?q=ACC-1").get_data(as_text=True)
    assert [int(i) for i in re.findall(r'data-study-id="(\d+)"', html)] == [2, 1, 4]
    # Links to studies carry the filters, so next/previous stay inside them.
    assert 'href="/studies/4?q=ACC-1"' in html
    study = client.get("/studies/4?q=ACC-1").get_data(as_text=True)
    assert 'id="prev-study" href="/studies/1?q=ACC-1"' in study and 'id="next-study"' not in study
    rows = client.get("/worklist/rows?reviewed=yes")
    assert rows.headers["X-Total-Count"] == "2"
    assert [int(i) for i in re.findall(r'data-study-id="(\d+)"', rows.get_data(as_text=True))] == [
        1,
        3,
    ]
    page = client.get("/?status=nope")
    assert page.status_code == 400 and "unknown status" in page.get_data(as_text=True)


def test_a_search_leaves_no_patient_id_in_the_request_log(app, caplog) -> None:  # type: ignore[no-untyped-def]
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with serving(app) as base:
        with caplog.at_level(logging.INFO):
            form = browser.open(base + "/login", timeout=10).read().decode()
            token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
            data = urllib.parse.urlencode(
                {"username": "rad", "password": PASSWORD, "csrf_token": token}
            ).encode()
            browser.open(base + "/login", data=data, timeout=10)
            bodies = [
                browser.open(base + path, timeout=10).read().decode()
                for path in ("/?q=P-3", "/api/worklist?q=P-3", "/worklist/rows?q=P-3")
            ]
    assert all('"id":3' in b.replace(" ", "") or 'data-study-id="3"' in b for b in bodies)
    lines = [r.getMessage() for r in caplog.records if r.name == "werkzeug"]
    assert sum("?…" in line for line in lines) == 3, lines
    assert not any("P-3" in r.getMessage() for r in caplog.records)
