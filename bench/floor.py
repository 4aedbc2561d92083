"""The floors: the same stack (aiohttp + uvloop, asyncpg, redis-py, PyJWT, msgspec) doing
exactly the work each path's contract requires, written minimally, so a real path is
measured against what that work costs on this machine in the same run.

The floor writes into its own database with the project's real schema (migrated by the real
CLI), so every insert maintains the same indexes, constraints and outbox trigger as the real
path's. Credentials the real service caches in-process (API keys, widget tokens) are plain
dicts here, filled at start-up. Each handler's docstring lists its work; tests/
test_bench_floor.py checks that each does it. What the floors do not do, on purpose: input
validation beyond decoding, problem+json errors, metrics, tracing, the org's policy lookup
(in-process cached in the real path too), CORS headers.

The real path publishes outbox rows through the relay (XADD in batches, then marks them
published); a floor writes its outbox rows already marked published and XADDs its events
itself in the same Redis round trip as its other Redis writes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import jwt
import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.redis import RedisBreaker
from shared.web.ratelimit import Limit, RateLimiter

STREAM = "floor:events"  # the outbox rows' stream column
ISSUER = AUDIENCE = "floor"
SESSION_TTL = 24 * 3600
PAGE, MESSAGES_PER = 20, 200  # the widget history page's defaults (SessionConfig, pagination)
UNLIMITED = 100_000_000


@dataclass(frozen=True, slots=True)
class Floor:
    pool: asyncpg.Pool
    redis: aioredis.Redis
    prefix: str  # of every Redis key and of the events stream (<prefix>events)
    limiter: RateLimiter
    key: Ed25519PrivateKey
    org_id: uuid.UUID
    widget_id: uuid.UUID
    api_keys: dict[bytes, tuple[uuid.UUID, uuid.UUID]]  # sha256(key) -> (org, key id)
    widgets: dict[str, tuple[uuid.UUID, uuid.UUID]]  # widget token -> (org, widget id)


FLOOR: web.AppKey[Floor] = web.AppKey("floor", Floor)


class User(msgspec.Struct):
    token: str


class AuthBody(msgspec.Struct):
    userId: str
    email: str | None = None


class SessionBody(msgspec.Struct):
    widgetToken: str
    visitorToken: str | None = None
    user: User | None = None


class VisitorState(msgspec.Struct, array_like=True):
    visitor_id: str
    session_id: str
    wrapped: bytes
    expires_at: float
    contact_id: str | None


class SessionRecord(msgspec.Struct, array_like=True):
    id: str
    visitor_id: str
    expires_at: float


_auth = msgspec.json.Decoder(AuthBody)
_session = msgspec.json.Decoder(SessionBody)
_state = msgspec.msgpack.Decoder(VisitorState)
_record = msgspec.msgpack.Decoder(SessionRecord)
_pack = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _wrap(session_token: str, visitor_token: str, session_id: str) -> bytes:
    nonce = os.urandom(12)
    key = hashlib.sha256(b"wrap:" + visitor_token.encode()).digest()
    return nonce + AESGCM(key).encrypt(nonce, session_token.encode(), uuid.UUID(session_id).bytes)


def _unwrap(wrapped: bytes, visitor_token: str, session_id: str) -> str:
    key = hashlib.sha256(b"wrap:" + visitor_token.encode()).digest()
    return AESGCM(key).decrypt(wrapped[:12], wrapped[12:], uuid.UUID(session_id).bytes).decode()


def _ok(body: dict[str, Any]) -> web.Response:
    return web.Response(body=_json.encode(body), content_type="application/json")


def _event(kind: str, subject: str, data: dict[str, Any]) -> bytes:
    return _json.encode(
        {"id": str(uuid.uuid4()), "type": kind, "subject": subject, "occurredAt": time.time()}
        | {"data": data}
    )


# Outbox rows of one subject with their per-subject seqs, as a CTE pair: the rows the real
# outbox writes. (One seq bump for all of them: a statement cannot upsert one row twice.)
def _outbox_ctes(name: str, subject: str, *payloads: tuple[str, str]) -> str:
    n = len(payloads)
    rows = ", ".join(
        f"(gen_random_uuid(), '{STREAM}', '{kind}', {payload}, now(), {name}_seq.seq - {n - 1 - i})"
        for i, (kind, payload) in enumerate(payloads)
    )
    return (
        f"{name}_seq AS (INSERT INTO subject_seqs (subject, seq) VALUES ({subject}, {n})"
        f" ON CONFLICT (subject) DO UPDATE SET seq = subject_seqs.seq + {n} RETURNING seq),"
        f" {name}_row AS (INSERT INTO outbox (event_id, stream, event_type, payload, published_at)"
        f" SELECT e.i, e.s, e.t, e.p || convert_to(e.seq::text, 'UTF8'), e.at"
        f" FROM {name}_seq, LATERAL (VALUES {rows}) AS e(i, s, t, p, at, seq))"
    )


def _widget(floor: Floor, token: str) -> tuple[uuid.UUID, uuid.UUID]:
    found = floor.widgets.get(token)
    if found is None:
        raise web.HTTPUnauthorized()
    return found


def _verify(floor: Floor, token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, floor.key.public_key(), algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER
    )
    return claims


async def authenticate(request: web.Request) -> web.Response:
    """authenticate-user: the API key (a cached lookup of its hash); the per-key rate limit
    (one Redis round trip); the contact upsert and its outbox row with its seq (one
    statement); the event XADDed to the stream; one EdDSA signature."""
    floor = request.app[FLOOR]
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
    principal = floor.api_keys.get(_hash(bearer))
    if principal is None:
        raise web.HTTPUnauthorized()
    org_id, key_id = principal
    await floor.limiter.check(Limit(f"auth:{key_id}", UNLIMITED))
    body = _auth.decode(await request.read())
    attributes = {"email": {"value": body.email, "source": "server", "verified": True}}
    payload = _event("contact.authenticated", "", {"userId": body.userId, "email": body.email})
    contact_id, iat = await floor.pool.fetchrow(
        f"""WITH c AS (
               INSERT INTO contacts AS c (id, org_id, contact_key, user_id, verified_email, attributes)
               VALUES (gen_random_uuid(), $1, $2, $3, $4, $5::text::jsonb)
               ON CONFLICT (org_id, contact_key) DO UPDATE SET
                   attributes = c.attributes || EXCLUDED.attributes, updated_at = now()
               RETURNING c.id, floor(extract(epoch FROM clock_timestamp()))::bigint AS iat),
           {_outbox_ctes("ev", "(SELECT id::text FROM c)", ("contact.authenticated", "$6::bytea"))}
           SELECT id, iat FROM c""",
        org_id,
        f"user:{body.userId}",
        body.userId,
        body.email,
        _json.encode(attributes).decode(),
        payload,
    )
    await floor.redis.xadd(
        floor.prefix + "events", {"event": payload}, maxlen=100_000, approximate=True
    )
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": str(contact_id), "org": str(org_id)}
    claims |= {"iat": iat, "exp": iat + 3600, "jti": str(uuid.uuid4()), "userId": body.userId}
    token = jwt.encode(claims, floor.key, algorithm="EdDSA")
    return _ok({"token": token, "contactId": str(contact_id)})


async def _admit(floor: Floor, request: web.Request, body: SessionBody) -> uuid.UUID:
    """The widget token (a cached lookup) and the per-IP/widget/visitor limits (one round trip)."""
    org_id, widget_id = _widget(floor, body.widgetToken)
    limits = [Limit(f"ip:{request.remote}", UNLIMITED), Limit(f"wt:{widget_id}", UNLIMITED)]
    if body.visitorToken is not None:
        limits.append(Limit(f"v:{_hash(body.visitorToken).hex()[:32]}", UNLIMITED))
    await floor.limiter.check(*limits)
    return org_id


async def new_session(request: web.Request) -> web.Response:
    """A new visitor's first session: the widget token (cached) and the rate limits (one
    round trip); a visitor token and a session token, the session token wrapped to the
    visitor token (AES-GCM); the visitor row, the session row and their two outbox rows
    (visitor.created, session.resolved, each with its seq) in one statement; one Redis
    round trip that caches the visitor state and the session record and XADDs both events."""
    floor = request.app[FLOOR]
    body = _session.decode(await request.read())
    org_id = await _admit(floor, request, body)
    visitor_token, session_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    visitor_id, session_id = str(uuid.uuid4()), str(uuid.uuid4())
    wrapped = _wrap(session_token, visitor_token, session_id)
    expires = time.time() + SESSION_TTL
    created = _event("visitor.created", visitor_id, {"visitorId": visitor_id})
    resolved = _event("session.resolved", visitor_id, {"sessionId": session_id})
    await floor.pool.execute(
        f"""WITH v AS (INSERT INTO visitors (id, org_id, token_hash) VALUES ($1, $2, $3)),
                 s AS (INSERT INTO sessions (id, org_id, visitor_id, widget_token_id, level,
                           token_hash, token_wrapped, expires_at)
                       VALUES ($4, $2, $1, $5, 'anonymous', $6, $7, to_timestamp($8))),
                 {
            _outbox_ctes(
                "ev",
                "$1::text",
                ("visitor.created", "$9::bytea"),
                ("session.resolved", "$10::bytea"),
            )
        }
            SELECT 1""",
        uuid.UUID(visitor_id),
        org_id,
        _hash(visitor_token),
        uuid.UUID(session_id),
        floor.widget_id,
        _hash(session_token),
        wrapped,
        expires,
        created,
        resolved,
    )
    await _remember(
        floor,
        visitor_token,
        session_token,
        visitor_id,
        session_id,
        wrapped,
        expires,
        None,
        [created, resolved],
    )
    return _ok(
        {"sessionId": session_id, "sessionToken": session_token, "visitorToken": visitor_token}
    )


async def _remember(
    floor: Floor,
    visitor_token: str,
    session_token: str,
    visitor_id: str,
    session_id: str,
    wrapped: bytes,
    expires: float,
    contact_id: str | None,
    events: list[bytes],
) -> None:
    pipe = floor.redis.pipeline(transaction=False)
    state = VisitorState(visitor_id, session_id, wrapped, expires, contact_id)
    pipe.set(f"{floor.prefix}v:{_hash(visitor_token).hex()}", _pack.encode(state), ex=SESSION_TTL)
    record = SessionRecord(session_id, visitor_id, expires)
    pipe.set(f"{floor.prefix}s:{_hash(session_token).hex()}", _pack.encode(record), ex=SESSION_TTL)
    for payload in events:
        pipe.xadd(floor.prefix + "events", {"event": payload}, maxlen=100_000, approximate=True)
    await pipe.execute()


async def returning_session(request: web.Request) -> web.Response:
    """A returning visitor whose session is handed back: the widget token (cached) and the
    rate limits (one round trip); the visitor state (one Redis GET); with a contact token,
    one EdDSA verification; the session token unwrapped (AES-GCM). No Postgres."""
    floor = request.app[FLOOR]
    body = _session.decode(await request.read())
    await _admit(floor, request, body)
    assert body.visitorToken is not None
    raw = await floor.redis.get(f"{floor.prefix}v:{_hash(body.visitorToken).hex()}")
    if not isinstance(raw, bytes):
        raise web.HTTPNotFound()
    state = _state.decode(raw)
    if body.user is not None and _verify(floor, body.user.token)["sub"] != state.contact_id:
        raise web.HTTPConflict()
    token = _unwrap(state.wrapped, body.visitorToken, state.session_id)
    return _ok(
        {"sessionId": state.session_id, "sessionToken": token, "visitorToken": body.visitorToken}
    )


async def login(request: web.Request) -> web.Response:
    """A returning anonymous visitor's first verified session, with its login merge: the
    widget token (cached) and the rate limits (one round trip); one EdDSA verification; the
    visitor state (one Redis GET); one statement that locks the visitor row, binds the device,
    checks for browser-bound sessions to merge, records the merge request and the new session
    and writes their two outbox rows (history.merge_requested, session.resolved); one Redis
    round trip that caches the new state and record and XADDs both events."""
    floor = request.app[FLOOR]
    body = _session.decode(await request.read())
    org_id = await _admit(floor, request, body)
    assert body.visitorToken is not None
    assert body.user is not None
    claims = _verify(floor, body.user.token)
    raw = await floor.redis.get(f"{floor.prefix}v:{_hash(body.visitorToken).hex()}")
    if not isinstance(raw, bytes):
        raise web.HTTPNotFound()
    visitor_id, contact_id = _state.decode(raw).visitor_id, claims["sub"]
    session_id, merge_id = str(uuid.uuid4()), str(uuid.uuid4())
    session_token = secrets.token_urlsafe(32)
    wrapped = _wrap(session_token, body.visitorToken, session_id)
    expires = min(time.time() + SESSION_TTL, float(claims["exp"]))
    merge = _event("history.merge_requested", contact_id, {"mergeId": merge_id})
    resolved = _event("session.resolved", visitor_id, {"sessionId": session_id})
    merged = await floor.pool.fetchval(
        f"""WITH v AS (UPDATE visitors SET last_seen_at = now()
                       WHERE id = $1 AND unbound_at IS NULL RETURNING id),
                 b AS (INSERT INTO device_bindings (org_id, contact_id, visitor_id,
                           last_merge_requested_at)
                       SELECT $2, $3, id, clock_timestamp() FROM v
                       ON CONFLICT (contact_id, visitor_id, external_id)
                       DO UPDATE SET last_merge_requested_at = EXCLUDED.last_merge_requested_at),
                 u AS (SELECT EXISTS (SELECT 1 FROM sessions WHERE visitor_id = $1
                                      AND level <> 'verified') AS unmerged),
                 m AS (INSERT INTO merge_requests (id, org_id, visitor_id, contact_id)
                       SELECT $4, $2, $1, $3 FROM u WHERE unmerged),
                 s AS (INSERT INTO sessions (id, org_id, visitor_id, widget_token_id, level,
                           contact_id, token_hash, token_wrapped, expires_at)
                       SELECT $5, $2, id, $6, 'verified', $3, $7, $8, to_timestamp($9) FROM v),
                 {_outbox_ctes("merge_ev", "$3::text", ("history.merge_requested", "$10::bytea"))},
                 {_outbox_ctes("session_ev", "$1::text", ("session.resolved", "$11::bytea"))}
            SELECT unmerged FROM u""",
        uuid.UUID(visitor_id),
        org_id,
        uuid.UUID(contact_id),
        uuid.UUID(merge_id),
        uuid.UUID(session_id),
        floor.widget_id,
        _hash(session_token),
        wrapped,
        expires,
        merge,
        resolved,
    )
    await _remember(
        floor,
        body.visitorToken,
        session_token,
        visitor_id,
        session_id,
        wrapped,
        expires,
        contact_id,
        [merge, resolved],
    )
    return _ok(
        {
            "sessionId": session_id,
            "sessionToken": session_token,
            "merge": {"id": merge_id} if merged else None,
        }
    )


async def history(request: web.Request) -> web.Response:
    """The widget's history page of a browser-bound session: the session token checked (one
    Redis GET of its record, its id and expiry compared); the rate limits (one round trip);
    one statement reading the scope's newest page of conversations with each one's latest
    messages."""
    floor = request.app[FLOOR]
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
    raw = await floor.redis.get(f"{floor.prefix}s:{_hash(bearer).hex()}")
    if not isinstance(raw, bytes):
        raise web.HTTPUnauthorized()
    record = _record.decode(raw)
    if record.id != request.match_info["session_id"] or record.expires_at <= time.time():
        raise web.HTTPUnauthorized()
    await floor.limiter.check(
        Limit(f"ip:{request.remote}", UNLIMITED),
        Limit(f"wt:{floor.widget_id}", UNLIMITED),
        Limit(f"v:{record.visitor_id}", UNLIMITED),
    )
    rows = await floor.pool.fetch(
        """SELECT c.id, c.created_at, m.id AS message_id, m.author, m.body, m.sender_verified,
                  m.created_at AS message_at
           FROM (SELECT id, created_at FROM conversations
                 WHERE org_id = $1 AND visitor_id = $2
                 ORDER BY created_at DESC, id DESC LIMIT $3) AS c
           LEFT JOIN LATERAL (SELECT * FROM messages WHERE conversation_id = c.id
                              ORDER BY created_at DESC, id DESC LIMIT $4) AS m ON true""",
        floor.org_id,
        uuid.UUID(record.visitor_id),
        PAGE + 1,
        MESSAGES_PER + 1,
    )
    conversations: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        messages = conversations.setdefault(str(r["id"]), [])
        if r["message_id"] is not None:
            messages.append({"id": str(r["message_id"]), "author": r["author"], "text": r["body"]})
    return _ok({"conversations": [{"id": k, "messages": v} for k, v in conversations.items()]})


async def resources(app: web.Application) -> AsyncIterator[None]:
    """The org, its widget token and API key rows the floor's writes point at, and the
    in-process credential caches; ``FLOOR_API_KEY`` and ``FLOOR_WIDGET_TOKEN`` come from the
    bench, which sends them; ``FLOOR_PREFIX`` (default ``floor:``) prefixes its Redis keys."""
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=2, max_size=10)
    assert pool is not None
    org_id, widget_id, key_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    widget_token, api_key = os.environ["FLOOR_WIDGET_TOKEN"], os.environ["FLOOR_API_KEY"]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO orgs (id, name) VALUES ($1, 'floor')", org_id)
        await conn.execute(
            """INSERT INTO widget_tokens (id, org_id, token_hash, display_prefix)
               VALUES ($1, $2, $3, 'floor')""",
            widget_id,
            org_id,
            _hash(widget_token),
        )
    redis = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    prefix = os.environ.get("FLOOR_PREFIX", "floor:")
    app[FLOOR] = Floor(
        pool=pool,
        redis=redis,
        prefix=prefix,
        limiter=RateLimiter(redis, prefix, RedisBreaker(timeout=0.25)),
        key=Ed25519PrivateKey.generate(),
        org_id=org_id,
        widget_id=widget_id,
        api_keys={_hash(api_key): (org_id, key_id)},
        widgets={widget_token: (org_id, widget_id)},
    )
    yield
    await redis.aclose()
    await pool.close()


async def healthz(request: web.Request) -> web.Response:
    return _ok({"ok": True, "orgId": str(request.app[FLOOR].org_id)})


def create_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(resources)
    app.router.add_post("/floor/authenticate", authenticate)
    app.router.add_post("/floor/sessions/new", new_session)
    app.router.add_post("/floor/sessions/returning", returning_session)
    app.router.add_post("/floor/sessions/login", login)
    app.router.add_get("/floor/sessions/{session_id}/history", history)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    import uvloop

    uvloop.install()
    web.run_app(
        create_app(),
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
