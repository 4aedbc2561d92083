"""Run the operator CLI, ``widget-identity``, as a user would: a subprocess with the
environment's settings, its JSON output parsed."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from shared.config import Settings


async def cli(settings: Settings, *args: str) -> tuple[int, Any, str]:
    assert settings.key_encryption_key is not None
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_CLUSTER": "true" if settings.redis_cluster else "false",
        "KEY_ENCRYPTION_KEY": base64.urlsafe_b64encode(settings.key_encryption_key).decode(),
        "STREAM_PREFIX": settings.stream_prefix,
        "STREAM_PARTITIONS": str(settings.stream_partitions),
        "LOG_JSON": "false",
    }
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "widget-identity"),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    parsed = json.loads(out) if out.strip() else None
    assert process.returncode is not None
    return process.returncode, parsed, err.decode()
