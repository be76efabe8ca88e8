"""`hydrabrain auth token create|list|revoke`: API tokens for `[auth] mode = "tokens"`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from hydrabrain.shared.auth import SCOPES, TokenStore


def register(sub: argparse._SubParsersAction) -> None:
    auth = sub.add_parser("auth", help="API tokens for serving over HTTP with [auth] mode = \"tokens\"",
                          description="Issue, list and revoke the API tokens HTTP servers accept with [auth] mode = \"tokens\".")
    tokens = auth.add_subparsers(dest="auth_command", metavar="COMMAND").add_parser("token", help="create, list or revoke API tokens")
    verbs = tokens.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    known = ", ".join(SCOPES)
    create = verbs.add_parser("create", help="issue a token (shown once; only its hash is kept)")
    create.add_argument("--user", required=True, help="who the token acts for (the memory server serves this user's memories)")
    create.add_argument("--scopes", required=True, help=f"comma-separated scopes, from: {known}")
    create.add_argument("--note", default="", help="a reminder of what the token is for")
    create.add_argument("--json", action="store_true", help="print the token and its record as JSON")
    create.set_defaults(func=_create)
    listing = verbs.add_parser("list", help="the tokens issued (never the tokens themselves)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    revoke = verbs.add_parser("revoke", help="revoke a token by id; running servers refuse it at the next request")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=_revoke)
    auth.set_defaults(func=lambda args: auth.print_help() or 2)
    tokens.set_defaults(func=lambda args: tokens.print_help() or 2)


def _store(args: argparse.Namespace) -> TokenStore:
    from hydrabrain.servers.cli import settings_from

    return TokenStore(settings_from(args).home)


def _create(args: argparse.Namespace) -> int:
    try:
        token, record = _store(args).create(args.user, args.scopes, note=args.note)
    except ValueError as exc:
        print(f"hydrabrain auth: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"token": token, **record.public()}))
    else:
        print(token)
        print(f"token {record.id} for {record.user} with {', '.join(record.scopes)}; it is shown only now, keep it secret", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    records = _store(args).list()
    if args.json:
        print(json.dumps([r.public() for r in records], indent=1))
        return 0
    if not records:
        print("no tokens; create one with `hydrabrain auth token create --user NAME --scopes memory:read,memory:write`")
    for r in records:
        created = datetime.fromtimestamp(r.created_at, UTC).strftime("%Y-%m-%d %H:%M")
        state = "revoked" if r.revoked_at else "active"
        print(f"{r.id}  {r.user:<16} {state:<8} {created}  {','.join(r.scopes)}  {r.note}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        record = _store(args).revoke(args.token_id)
    except KeyError as exc:
        print(f"hydrabrain auth: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"revoked {record.id} ({record.user})")
    return 0
