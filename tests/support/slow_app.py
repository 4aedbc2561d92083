"""A service process with one deliberately slow route and one worker that ignores its stop,
for the graceful-shutdown test."""

from __future__ import annotations

import asyncio

from aiohttp import web

from shared.config import Settings
from shared.lifecycle import add_worker, serve
from shared.service import service_app
from shared.web.http import json_response


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("seconds", "0.5")))
    return json_response({"done": True})


async def stubborn(stop: asyncio.Event) -> None:
    """Never looks at ``stop``: only cancellation ends it."""
    await asyncio.Event().wait()


def main() -> None:
    settings = Settings.from_env()
    app = service_app(settings, name="slow-test")
    app.router.add_get("/slow", slow)
    add_worker(app, "stubborn", lambda app: stubborn)
    serve(app, settings)


if __name__ == "__main__":
    main()
