"""Settings come from the environment and are validated before anything starts."""

from __future__ import annotations

import base64
import inspect
import re
from pathlib import Path

import pytest

from shared.config import Settings
from shared.errors import ConfigError

BASE = {"DATABASE_URL": "postgresql://u@db/wi", "REDIS_URL": "redis://cache:6379/0"}


def test_defaults_are_what_the_readme_says() -> None:
    settings = Settings.from_env(BASE)
    assert settings.port == 8080
    assert settings.events_stream == "wi:events"
    assert settings.dead_letter_stream("history") == "wi:events:dlq:history"
    assert settings.admin_token is None  # the admin API stays closed until a token is set
    assert settings.shutdown_timeout == 25.0


def test_every_variable_the_service_reads_is_in_the_readme_table() -> None:
    source = inspect.getsource(Settings.from_env)
    read = set(re.findall(r'reader\.\w+\(\s*(?:#[^\n]*\n\s*)*"([A-Z][A-Z0-9_]+)"', source))
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("### Configuration (environment)") :]
    table = table[: table.index("\n\n", table.index("|---|"))]
    first_cells = re.findall(r"(?m)^\| ([^|]+) \|", table)
    documented = {n for cell in first_cells for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}
    assert len(read) > 20  # the pattern still finds what from_env reads
    assert read - documented == set(), "read but not in README's configuration table"
    assert documented - read == set(), "in README's configuration table but never read"


def test_values_are_parsed_and_typed() -> None:
    kek = base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("=")
    settings = Settings.from_env(
        {
            **BASE,
            "PORT": "9000",
            "KEY_ENCRYPTION_KEY": kek,
            "RELAY_ENABLED": "false",
            "LOG_LEVEL": "debug",
            "REDIS_SOCKET_TIMEOUT": "1.5",
            "STREAM_RETENTION_SECONDS": "600",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4318",
            "WIDGET_REQUEST_TIMEOUT": "3",
            "DB_LOCK_TIMEOUT": "0.25",
            "DRAIN_DELAY": "2",
        }
    )
    assert settings.otel_exporter_otlp_endpoint == "http://otel-collector:4318"
    assert settings.otel_service_name is None  # tracing names the service itself
    assert (settings.widget_request_timeout, settings.db_lock_timeout) == (3.0, 0.25)
    assert settings.drain_delay == 2.0
    assert (settings.port, settings.relay_enabled, settings.log_level) == (9000, False, "DEBUG")
    assert (settings.redis_socket_timeout, settings.stream_retention_seconds) == (1.5, 600.0)
    assert settings.key_encryption_key == b"k" * 32


def test_what_needs_a_session_goes_to_the_direct_url_when_there_is_one() -> None:
    settings = Settings.from_env(BASE)
    assert (settings.database_pool_mode, settings.database_direct_url) == ("session", None)
    assert settings.database_session_url == BASE["DATABASE_URL"]
    pooled = Settings.from_env(
        {
            **BASE,
            "DATABASE_URL": "postgresql://u@pgbouncer:6432/wi",
            "DATABASE_DIRECT_URL": "postgresql://u@db/wi",
            "DATABASE_POOL_MODE": "Transaction",
        }
    )
    assert pooled.database_pool_mode == "transaction"
    assert pooled.database_session_url == "postgresql://u@db/wi"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"DATABASE_URL": ""}, "DATABASE_URL: not set"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL: scheme 'mysql'"),
        ({"DATABASE_URL": "postgresql://h:99999/x"}, "DATABASE_URL: malformed"),
        ({"REDIS_URL": "cache:6379"}, "REDIS_URL: scheme"),
        ({"PORT": "70000"}, "PORT: '70000' is out of range"),
        ({"SHUTDOWN_TIMEOUT": "-1"}, "SHUTDOWN_TIMEOUT"),
        ({"RELAY_ENABLED": "perhaps"}, "RELAY_ENABLED: cannot parse"),
        ({"REDIS_SOCKET_TIMEOUT": "0"}, "REDIS_SOCKET_TIMEOUT"),
        ({"STREAM_RETENTION_SECONDS": "-1"}, "STREAM_RETENTION_SECONDS"),
        ({"ADMIN_TOKEN": "short"}, "ADMIN_TOKEN: too short"),
        ({"KEY_ENCRYPTION_KEY": "!!!"}, "KEY_ENCRYPTION_KEY"),
        ({"DB_POOL_MIN": "20", "DB_POOL_MAX": "5"}, "DB_POOL_MIN: must not exceed DB_POOL_MAX"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT: scheme"),
        ({"OTEL_SERVICE_NAME": "   "}, "OTEL_SERVICE_NAME: '   ' is out of range"),
        ({"REQUEST_TIMEOUT": "0"}, "REQUEST_TIMEOUT"),
        ({"DB_ACQUIRE_TIMEOUT": "-1"}, "DB_ACQUIRE_TIMEOUT"),
        # The drain delay is spent out of the shutdown budget, so it must leave some.
        ({"DRAIN_DELAY": "30"}, "DRAIN_DELAY: must be below SHUTDOWN_TIMEOUT"),
        ({"DATABASE_DIRECT_URL": "mysql://x/y"}, "DATABASE_DIRECT_URL: scheme 'mysql'"),
        # Statement pooling cannot run a transaction at all.
        ({"DATABASE_POOL_MODE": "statement"}, "DATABASE_POOL_MODE: 'statement' is out of range"),
        # Through a transaction pooler the relay's lock and LISTEN would have no session.
        ({"DATABASE_POOL_MODE": "transaction"}, "DATABASE_DIRECT_URL: required"),
        ({"STREAM_PARTITIONS": "0"}, "STREAM_PARTITIONS: '0' is out of range"),
        ({"STREAM_PARTITIONS": "four"}, "STREAM_PARTITIONS: cannot parse"),
        ({"CONSUMER_LEASE_SECONDS": "0.5"}, "CONSUMER_LEASE_SECONDS: '0.5' is out of range"),
    ],
)
def test_a_bad_variable_is_named_in_one_line(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, **env})
    assert names in str(caught.value)
    assert "\n" not in str(caught.value)
