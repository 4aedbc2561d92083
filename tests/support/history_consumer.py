"""The history merge consumer as its own process, for tests that SIGKILL it.

Runs exactly what ``widget-identity consume history`` runs (``create_consumer_app``), with
settings from the environment plus the consumer timings tests need (not environment
settings in production): CLAIM_IDLE_MS, BATCH, CONCURRENCY. Run as
``python -m tests.support.history_consumer``.
"""

from __future__ import annotations

import os

from services.history.app import create_consumer_app
from shared.config import Settings
from shared.lifecycle import serve
from shared.observability import configure_logging


def main() -> None:
    settings = Settings.from_env().with_overrides(
        consumer_block_ms=100,
        consumer_claim_idle_ms=int(os.environ.get("CLAIM_IDLE_MS", "300")),
        consumer_batch=int(os.environ.get("BATCH", "100")),
        consumer_concurrency=int(os.environ.get("CONCURRENCY", "8")),
    )
    configure_logging(settings.log_level, json=settings.log_json)
    serve(create_consumer_app(settings), settings, host="127.0.0.1", port=0)


if __name__ == "__main__":
    main()
