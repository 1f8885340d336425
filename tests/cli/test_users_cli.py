"""``cxr-triage users``: create (refusing a second and a short password), and a token."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_users_cli(settings) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.conftest import REPO, settings_env

    def users(*args: str, stdin: str = "") -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli.main", "users", *args],
            input=stdin,
            env=settings_env(settings),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = users(
        "create", "alice", "--role", "radiologist", "--password-stdin", stdin="s3cret-pass\n"
    )
    assert ok.returncode == 0 and "created radiologist alice" in ok.stdout
    again = users("create", "alice", "--role", "admin", "--password-stdin", stdin="another-pass\n")
    assert again.returncode == 2 and "already exists" in again.stderr
    short = users("create", "bob", "--role", "admin", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 8" in short.stderr
    token = users("token", "alice")
    assert token.returncode == 0 and token.stdout.strip().startswith("cxr_")
