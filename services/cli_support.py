"""What every ``widget-identity`` command group shares: settings with logging configured,
JSON on stdout, and running a coroutine to completion.

Its own module so that the service CLIs (e.g. ``services.token_issuance.cli``) and the top
level ``services.cli``, which registers them, both import it and never each other back.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any

from shared.config import Settings
from shared.observability import configure_logging


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def load_settings() -> Settings:
    settings = Settings.from_env()
    configure_logging(settings.log_level, json=settings.log_json)
    return settings
