"""Admin commands of ``widget-identity``: orgs, API keys, widget tokens, signing keys.

They decode their input with the HTTP API's own decoders and call the same rule functions,
so the CLI and ``/admin/v1`` cannot drift apart. Output is the HTTP response body as JSON;
a refused command prints the problem document on stderr and exits 1. A change that ends or
alters a credential is announced to the serving processes exactly as the API announces it.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec

from services.cli_support import load_settings, print_json, run_async
from services.token_issuance import api_keys, orgs, signing_keys, widget_tokens
from services.token_issuance.broadcast import from_settings
from services.token_issuance.keyring import Keyring
from services.token_issuance.schemas import (
    ADMIN_PAGE_MAX,
    create_api_key_decoder,
    create_org_decoder,
    create_widget_token_decoder,
    update_org_decoder,
    update_widget_token_decoder,
)
from shared import db
from shared.config import Settings
from shared.errors import Problem, validation_failed
from shared.identity.revocation import announce_key_added, announce_key_deleted
from shared.redis import create_redis
from shared.web.http import parse_uuid
from shared.web.pagination import PageRequest, parse_page

T = TypeVar("T")
Work = Callable[[asyncpg.Pool, Settings], Awaitable[Any]]


def _decode(decoder: msgspec.json.Decoder[T], body: dict[str, Any]) -> T:
    try:
        return decoder.decode(json.dumps(body))
    except msgspec.ValidationError as exc:
        raise validation_failed(str(exc)) from None


def _json_arg(raw: str | None, what: str) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise validation_failed(f"{what} is not valid JSON ({exc})") from None


def _run(work: Work) -> None:
    settings = load_settings()

    async def go() -> Any:
        pool = await db.create_pool(settings, min_size=1)
        try:
            return await work(pool, settings)
        finally:
            await pool.close()

    try:
        result = run_async(go())
    except Problem as problem:
        sys.stderr.write(json.dumps(problem.body()) + "\n")
        raise SystemExit(1) from None
    print_json(msgspec.to_builtins(result))


def _org(args: argparse.Namespace) -> str:
    return parse_uuid(args.org, "org")


def _page(args: argparse.Namespace) -> PageRequest[uuid.UUID]:
    return parse_page(args.limit, args.cursor, maximum=ADMIN_PAGE_MAX)


async def _announce_new_key(settings: Settings, kid: str) -> None:
    # Running verifiers look the new kid up at once instead of after their back-off.
    redis = create_redis(settings)
    try:
        await announce_key_added(redis, settings, kid)
    finally:
        await redis.aclose()


def _cmd_org_create(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"name": args.name}
    if args.policy is not None:
        body["policy"] = _json_arg(args.policy, "--policy")

    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        request = _decode(create_org_decoder, body)
        kek = Keyring(settings.key_encryption_key).kek
        created = await orgs.create_org(pool, kek, settings.token_algorithms[0], request)
        if created.signing_key is not None:
            await _announce_new_key(settings, created.signing_key.kid)
        return created

    _run(work)


def _cmd_org_show(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        return await orgs.get_org(pool, _org(args))

    _run(work)


def _cmd_org_list(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        return await orgs.list_orgs(pool, _page(args))

    _run(work)


def _update_org(args: argparse.Namespace, body: dict[str, Any]) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        request = _decode(update_org_decoder, body)
        return await orgs.update_org(pool, _org(args), request, from_settings(settings))

    _run(work)


def _cmd_org_update_policy(args: argparse.Namespace) -> None:
    _update_org(args, {"policy": _json_arg(args.policy, "--policy")})


def _cmd_org_disable(args: argparse.Namespace) -> None:
    _update_org(args, {"disabled": True})


def _cmd_org_enable(args: argparse.Namespace) -> None:
    _update_org(args, {"disabled": False})


def _cmd_api_key_create(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"scopes": [s.strip() for s in args.scopes.split(",") if s.strip()]}
    if args.expires_at is not None:
        body["expiresAt"] = args.expires_at

    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        request = _decode(create_api_key_decoder, body)
        return await api_keys.create_api_key(pool, _org(args), request)

    _run(work)


def _cmd_api_key_list(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        return await api_keys.list_api_keys(pool, _org(args), _page(args))

    _run(work)


def _cmd_api_key_revoke(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        key_id = parse_uuid(args.key_id, "API key")
        return await api_keys.revoke_api_key(pool, _org(args), key_id, from_settings(settings))

    _run(work)


def _cmd_widget_token_create(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {
        "allowedOrigins": args.origin,
        "settings": _json_arg(args.settings, "--settings") or {},
    }

    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        request = _decode(create_widget_token_decoder, body)
        return await widget_tokens.create_widget_token(pool, _org(args), request)

    _run(work)


def _cmd_widget_token_list(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        return await widget_tokens.list_widget_tokens(pool, _org(args), _page(args))

    _run(work)


def _cmd_widget_token_update(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {}
    if args.origin is not None:
        body["allowedOrigins"] = args.origin
    if args.settings is not None:
        body["settings"] = _json_arg(args.settings, "--settings")

    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        token_id = parse_uuid(args.id, "widget token")
        request = _decode(update_widget_token_decoder, body)
        return await widget_tokens.update_widget_token(
            pool, _org(args), token_id, request, from_settings(settings)
        )

    _run(work)


def _cmd_widget_token_revoke(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        token_id = parse_uuid(args.id, "widget token")
        return await widget_tokens.revoke_widget_token(
            pool, _org(args), token_id, from_settings(settings)
        )

    _run(work)


def _cmd_keys_list(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        page = parse_page(args.limit, args.cursor, maximum=ADMIN_PAGE_MAX, id_type=str)
        return await signing_keys.list_signing_keys(pool, _org(args), page)

    _run(work)


def _cmd_keys_rotate(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        kek = Keyring(settings.key_encryption_key).kek
        rotated = await signing_keys.rotate(pool, kek, _org(args), settings.token_algorithms[0])
        await _announce_new_key(settings, rotated.kid)
        return rotated

    _run(work)


def _cmd_keys_delete(args: argparse.Namespace) -> None:
    async def work(pool: asyncpg.Pool, settings: Settings) -> Any:
        result = await signing_keys.delete(pool, _org(args), args.kid)
        # Running services drop the key at once (they would anyway within their refresh).
        redis = create_redis(settings)
        try:
            await announce_key_deleted(redis, settings, args.kid)
        finally:
            await redis.aclose()
        return result

    _run(work)


def _paged(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", help=f"page size, 1..{ADMIN_PAGE_MAX} (default 20)")
    p.add_argument("--cursor", help="nextCursor of the previous page")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    org = sub.add_parser("org", help="organisations and their policy").add_subparsers(
        dest="org_command", required=True, metavar="ACTION"
    )
    p = org.add_parser("list", help="list orgs, oldest first")
    _paged(p)
    p.set_defaults(func=_cmd_org_list)
    p = org.add_parser("create", help="create an org (with its first signing key)")
    p.add_argument("--name", required=True)
    p.add_argument("--policy", help="policy as a JSON object")
    p.set_defaults(func=_cmd_org_create)
    p = org.add_parser("show", help="show an org and its effective policy")
    p.add_argument("--org", required=True, help="org id")
    p.set_defaults(func=_cmd_org_show)
    p = org.add_parser("update-policy", help="merge-patch an org's policy (null resets a key)")
    p.add_argument("--org", required=True, help="org id")
    p.add_argument("--policy", required=True, help="JSON merge patch")
    p.set_defaults(func=_cmd_org_update_policy)
    p = org.add_parser("disable", help="disable an org (its keys and tokens stop working)")
    p.add_argument("--org", required=True, help="org id")
    p.set_defaults(func=_cmd_org_disable)
    p = org.add_parser("enable", help="enable a disabled org again")
    p.add_argument("--org", required=True, help="org id")
    p.set_defaults(func=_cmd_org_enable)

    keys = sub.add_parser("api-key", help="org API keys").add_subparsers(
        dest="api_key_command", required=True, metavar="ACTION"
    )
    p = keys.add_parser("create", help="create an API key (printed once)")
    p.add_argument("--org", required=True, help="org id")
    p.add_argument("--scopes", required=True, help="comma-separated, e.g. contacts:authenticate")
    p.add_argument("--expires-at", help="ISO 8601 time with zone")
    p.set_defaults(func=_cmd_api_key_create)
    p = keys.add_parser("list", help="list an org's API keys (never the secret)")
    p.add_argument("--org", required=True, help="org id")
    _paged(p)
    p.set_defaults(func=_cmd_api_key_list)
    p = keys.add_parser("revoke", help="revoke an API key")
    p.add_argument("--org", required=True, help="org id")
    p.add_argument("--key-id", required=True)
    p.set_defaults(func=_cmd_api_key_revoke)

    widget = sub.add_parser("widget-token", help="widget (embed) tokens").add_subparsers(
        dest="widget_token_command", required=True, metavar="ACTION"
    )
    p = widget.add_parser("create", help="create a widget token")
    p.add_argument("--org", required=True, help="org id")
    p.add_argument("--origin", required=True, action="append", help="allowed origin (repeat)")
    p.add_argument("--settings", help="widget settings as a JSON object")
    p.set_defaults(func=_cmd_widget_token_create)
    p = widget.add_parser("list", help="list an org's widget tokens")
    p.add_argument("--org", required=True, help="org id")
    _paged(p)
    p.set_defaults(func=_cmd_widget_token_list)
    p = widget.add_parser("update", help="replace a widget token's origins and/or settings")
    p.add_argument("--org", required=True, help="org id")
    p.add_argument("--id", required=True, help="widget token id")
    p.add_argument("--origin", action="append", help="allowed origin (repeat; replaces all)")
    p.add_argument("--settings", help="widget settings as a JSON object (replaces them)")
    p.set_defaults(func=_cmd_widget_token_update)
    p = widget.add_parser("revoke", help="revoke a widget token")
    p.add_argument("--org", required=True, help="org id")
    p.add_argument("--id", required=True, help="widget token id")
    p.set_defaults(func=_cmd_widget_token_revoke)

    signing = sub.add_parser("keys", help="contact-token signing keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    p = signing.add_parser("list", help="list an org's live signing keys")
    p.add_argument("--org", required=True, help="org id")
    _paged(p)
    p.set_defaults(func=_cmd_keys_list)
    p = signing.add_parser("rotate", help="add a new signing key (old ones keep verifying)")
    p.add_argument("--org", required=True, help="org id")
    p.set_defaults(func=_cmd_keys_rotate)
    p = signing.add_parser("delete", help="delete a signing key (its tokens stop verifying)")
    p.add_argument("--org", required=True, help="org id")
    p.add_argument("--kid", required=True)
    p.set_defaults(func=_cmd_keys_delete)
