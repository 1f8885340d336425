"""``cxr-triage users``: create accounts and issue API tokens."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sqlalchemy import select

from pipeline import migrate
from pipeline.db import session_factory, session_scope
from pipeline.models import PERSON_ROLES, ROLES, User
from pipeline.settings import Settings
from pipeline.users import UserError, create_user, issue_token


def register(sub: Any) -> None:
    users = sub.add_parser("users", help="accounts")
    users_sub = users.add_subparsers(dest="users_cmd", required=True)
    uc = users_sub.add_parser("create", help="add an account")
    uc.add_argument("username")
    uc.add_argument(
        "--role",
        choices=tuple(map(str, ROLES)),
        required=True,
        help="radiologist, admin (log in); feed (token may only send studies), "
        "monitor (token may only read /metrics)",
    )
    uc.add_argument("--password-stdin", action="store_true")
    ut = users_sub.add_parser("token", help="issue a new API token (printed once)")
    ut.add_argument("username")
    users.set_defaults(handler=cmd_users)


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(settings.db_url)
    with session_scope(session_factory(settings)) as session:
        if args.users_cmd == "create":
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
            if not password and args.role in PERSON_ROLES:
                raise UserError("give the password on standard input with --password-stdin")
            create_user(session, args.username, password, args.role)
            print(f"created {args.role} {args.username}")
        else:
            user = session.scalars(select(User).where(User.username == args.username)).first()
            if user is None:
                raise UserError(f"no user {args.username!r}")
            print(issue_token(session, user))
    return 0
