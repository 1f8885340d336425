"""Security checks on the live system: every route behind authentication, CSRF, token scopes,
no PHI in any log of the run, and no stored file named after what a sender called it."""

from __future__ import annotations

import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reliability.metrics import Row
from reliability.samples import PhiRegistry
from reliability.system import System

# Open without an account: the health check, the login form, and static files.
OPEN = {"/healthz", "/login", "/static/<path:filename>"}
# Sending studies (POST only: GET /dicomweb/studies is QIDO-RS, a read).
INGEST = {"/api/studies", "/dicomweb/studies"}
DENIED = {401, 403}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Client:
    """A real HTTP client: anonymous, a bearer token, or a logged-in session."""

    base: str
    token: str | None = None

    def __post_init__(self) -> None:
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()
        )

    def call(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        if method == "POST" and data is None:
            data = b""
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location", "")
            return exc.code, location or exc.read().decode(errors="replace")

    def csrf(self, path: str = "/login") -> str:
        found = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', self.call("GET", path)[1])
        return found.group(1) if found else ""

    def login(self, username: str, password: str) -> Client:
        status, where = self.call(
            "POST",
            "/login",
            {"username": username, "password": password, "csrf_token": self.csrf()},
        )
        if status != 302:
            raise RuntimeError(f"login as {username} failed: HTTP {status}")
        return self


def routes(system: System) -> list[tuple[str, str, str]]:
    """(rule, method, concrete path) for every route of the dashboard's URL map."""
    from dashboard import create_app

    app = create_app({"CXR_SETTINGS": system.settings})
    out = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<int:[^>]+>", "1", rule.rule)
        path = re.sub(r"<[^>]+>", "x", path)
        for method in sorted((rule.methods or set()) & {"GET", "POST"}):
            out.append((rule.rule, method, path))
    return sorted(out)


def _is_denied(status: int, body: str) -> bool:
    """401/403, or a redirect to the login page (HTML pages)."""
    return status in DENIED or (status == 302 and "/login" in body)


def route_failures(system: System) -> tuple[int, list[str]]:
    """Walk the URL map as anonymous, feed, monitor, radiologist and admin."""
    base, acc = system.base_url, system.accounts
    anon = Client(base)
    feed, monitor = Client(base, acc["feed"][2]), Client(base, acc["monitor"][2])
    rad = Client(base).login(acc["radiologist"][0], acc["radiologist"][1] or "")
    admin = Client(base).login(acc["admin"][0], acc["admin"][1] or "")
    failures, checks = [], 0
    for rule, method, path in routes(system):
        if rule in OPEN:
            continue
        is_admin = path.startswith(("/admin", "/api/admin"))
        ingest = method == "POST" and rule in INGEST
        expect = {  # who may pass: True allowed, False must be denied
            "anonymous": (anon, False),
            "feed token": (feed, ingest),
            "monitor token": (monitor, rule == "/metrics"),
            "radiologist": (rad, not is_admin and not ingest and rule != "/metrics"),
            "admin": (admin, not ingest),
        }
        for who, (client, allowed) in expect.items():
            if rule == "/logout" and who in ("radiologist", "admin"):
                continue  # would end the session the walk uses; csrf_failures posts it
            # A valid CSRF token, so what answers is the authentication check, not CSRF.
            form = None
            if method == "POST":
                page = "/" if who in ("radiologist", "admin") else "/login"
                form = {"csrf_token": client.csrf(page)}
            status, body = client.call(method, path, form)
            checks += 1
            if (
                status >= 500
                or (not allowed and not _is_denied(status, body))
                or (allowed and _is_denied(status, body))
            ):
                failures.append(f"{who} {method} {path}: HTTP {status}")
    return checks, failures


def csrf_failures(system: System) -> tuple[int, list[str]]:
    """A logged-in radiologist's form posts without the CSRF token are refused (400)."""
    acc = system.accounts["radiologist"]
    rad = Client(system.base_url).login(acc[0], acc[1] or "")
    posts = [
        ("/studies/1/review", {"action": "read"}),
        ("/logout", {}),
        ("/login", {"username": acc[0], "password": acc[1] or ""}),
    ]
    failures = []
    for path, form in posts:
        status, _ = rad.call("POST", path, form)
        if status != 400:
            failures.append(f"POST {path} without a CSRF token: HTTP {status}, expected 400")
    return len(posts), failures


def phi_hits(system: System, phi: PhiRegistry) -> tuple[int, list[str]]:
    """Occurrences of the run's fake patient names and ids in every log file of the run."""
    needles = sorted(phi.needles(), key=len, reverse=True)
    hits = []
    for log in system.log_files():
        text = log.read_text(errors="replace")
        found = [n for n in needles if n in text]
        if found:
            hits.append(
                f"{log.relative_to(system.workdir)}: {len(found)} PHI strings, e.g. {found[0][:6]}…"
            )
    return len(system.log_files()), hits


def stored_name_failures(system: System) -> list[str]:
    """Nothing the system stored may be named after an uploaded or sent file."""
    sent = {
        p.name
        for d in ("studies", "corpus", "load")
        for p in (system.workdir / d).rglob("*")
        if p.is_file()
    }
    sent |= {"cxr-evil.png", "cxr-evil2.png", "cxr-evil3.png", "big.dcm", "file.dcm"}
    assert system.settings is not None
    stored = [p for p in system.settings.data_dir.rglob("*") if p.is_file()]
    bad = [str(p) for p in stored if p.name in sent]
    escaped = [
        str(p) for p in (Path("/tmp/cxr-evil.png"), Path("/etc/cxr-evil3.png")) if p.exists()
    ]
    return [f"stored under a sent name: {b}" for b in bad[:5]] + [
        f"written outside the data dir: {e}" for e in escaped
    ]


def security_row(system: System, phi: PhiRegistry) -> Row:
    """All checks as one row; run it last, so the PHI scan sees every log of the profile."""
    row = Row("security: routes, CSRF, scopes, PHI in logs, stored names", system.profile.name)
    n_routes, failures = route_failures(system)
    n_csrf, csrf = csrf_failures(system)
    n_logs, hits = phi_hits(system, phi)
    names = stored_name_failures(system)
    row.sent = n_routes + n_csrf
    row.failures = failures[:8] + csrf + hits + names
    row.note = (
        f"{n_routes} route×role checks, {n_csrf} CSRF checks, {len(phi.names)} names and "
        f"{len(phi.ids)} ids searched in {n_logs} logs: {len(hits)} with PHI"
    )
    return row
