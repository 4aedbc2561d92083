"""The floor: the same stack (aiohttp + uvloop, asyncpg, redis-py, PyJWT) doing the least
possible work for a path, so the real service is measured against what the stack itself
costs on this machine in the same run.

- ``POST /floor/session``: one JSON decode, one signature check, one upsert, one XADD.
- ``POST /floor/authenticate``: one JSON decode, one upsert, one signature.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import asyncpg
import jwt
import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_KEY = Ed25519PrivateKey.generate()
_PUBLIC = _KEY.public_key()
TOKEN = jwt.encode(
    {"sub": "floor", "iss": "floor", "aud": "floor", "exp": int(time.time()) + 86400},
    _KEY,
    algorithm="EdDSA",
)

POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis", aioredis.Redis)


class Body(msgspec.Struct):
    id: str
    token: str | None = None


_decoder = msgspec.json.Decoder(Body)


async def session(request: web.Request) -> web.Response:
    body = _decoder.decode(await request.read())
    jwt.decode(body.token or TOKEN, _PUBLIC, algorithms=["EdDSA"], audience="floor", issuer="floor")
    await request.app[POOL].execute(
        "INSERT INTO floor_rows (id, n) VALUES ($1, 1) ON CONFLICT (id) DO UPDATE SET n = floor_rows.n + 1",
        body.id,
    )
    await request.app[REDIS].xadd("floor:events", {b"event": b'{"type":"floor"}'}, maxlen=10000)
    return web.json_response({"ok": True})


async def authenticate(request: web.Request) -> web.Response:
    body = _decoder.decode(await request.read())
    await request.app[POOL].execute(
        "INSERT INTO floor_rows (id, n) VALUES ($1, 1) ON CONFLICT (id) DO UPDATE SET n = floor_rows.n + 1",
        body.id,
    )
    token = jwt.encode({"sub": body.id, "exp": int(time.time()) + 3600}, _KEY, algorithm="EdDSA")
    return web.json_response({"token": token})


async def resources(app: web.Application) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=2, max_size=10)
    assert pool is not None
    await pool.execute(
        "CREATE TABLE IF NOT EXISTS floor_rows (id text PRIMARY KEY, n int NOT NULL)"
    )
    app[POOL] = pool
    app[REDIS] = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    yield
    await app[REDIS].aclose()
    await pool.close()


def main() -> None:
    import uvloop

    app = web.Application()
    app.cleanup_ctx.append(resources)
    app.router.add_post("/floor/session", session)
    app.router.add_post("/floor/authenticate", authenticate)
    app.router.add_get("/healthz", lambda r: asyncio.sleep(0, web.json_response({"ok": True})))
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), access_log=None, print=None)


if __name__ == "__main__":
    main()
