"""Typed settings read once from environment variables and validated at start-up.

A wrong value stops the process with one line naming the variable (``ConfigError``), never a
traceback from deep inside a driver.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

from shared.errors import ConfigError

T = TypeVar("T")

_PG_SCHEMES = ("postgres", "postgresql")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_REDIS_CLUSTER_SCHEMES = ("redis", "rediss")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Requests per minute; org policy may override each, these are the operator defaults."""

    authenticate_per_key: int = 600
    sessions_per_ip: int = 300
    sessions_per_widget_token: int = 6000
    sessions_per_visitor: int = 60


@dataclass(frozen=True, slots=True)
class Settings:
    # What the pool's connections use: Postgres itself, or a pooler in front of it.
    database_url: str
    redis_url: str
    # Where the connections that need a Postgres session of their own go (migrations and
    # their advisory lock; the outbox relay's leader lock and LISTEN): Postgres itself when
    # DATABASE_URL goes through a transaction pooler. Unset: DATABASE_URL.
    database_direct_url: str | None = None
    # "session": each pooled connection is a Postgres session of its own (Postgres itself,
    # or a pooler in session mode). "transaction": DATABASE_URL goes through a pooler in
    # transaction mode (PgBouncer's pool_mode = transaction), so consecutive transactions of
    # one connection may run on different server connections: no prepared statements kept
    # between them, no session state (shared.db).
    database_pool_mode: str = "session"
    port: int = 8080
    host: str = "0.0.0.0"
    admin_token: str | None = None
    # 32 raw bytes; wraps every org's private signing key at rest (AES-GCM).
    key_encryption_key: bytes | None = None
    token_issuer: str = "widget-identity"
    token_audience: str = "widget-identity:widget"
    # Contact-token algorithms the verifier accepts; the first one signs new keys.
    token_algorithms: tuple[str, ...] = ("EdDSA",)
    stream_prefix: str = "wi:"
    # Event streams: one (``<prefix>events``) or, past what one Redis shard or one consumer
    # carries, N partitions by a stable hash of the subject (shared.bus.partitions).
    stream_partitions: int = 1
    # A consumer process that has not shown itself alive for this long loses its partitions
    # to the others (with STREAM_PARTITIONS > 1; a clean stop hands them over at once).
    consumer_lease_seconds: float = 10.0
    log_level: str = "INFO"
    log_json: bool = True
    # SIGTERM: readiness turns 503 at once; the drain delay, in-flight requests and the
    # workers all fit in shutdown_timeout, after which the process exits regardless.
    shutdown_timeout: float = 25.0
    # 0 here, because only a deployment knows how long its load balancer takes to notice an
    # unready pod (a consumer process or a test has none): the manifests and `make run` set it.
    drain_delay: float = 0.0
    # Time budgets per request kind (shared.web.deadlines): the browser waits on the widget.
    widget_request_timeout: float = 5.0
    request_timeout: float = 10.0
    admin_request_timeout: float = 30.0
    db_pool_min: int = 1
    db_pool_max: int = 10
    db_command_timeout: float = 10.0
    # The longest a request waits for a pooled connection (its kind's bulkhead included).
    db_acquire_timeout: float = 2.0
    # Postgres server settings on the pool's connections: a statement blocked on a lock gives
    # up (and its connection) after db_lock_timeout; any statement after db_statement_timeout.
    db_lock_timeout: float = 0.5
    db_statement_timeout: float = 8.0
    redis_socket_timeout: float = 5.0
    # Per Redis server; on a cluster, per node.
    redis_max_connections: int = 64
    # REDIS_URL names a node of a Redis Cluster (or several, comma-separated): every client
    # is a cluster client, and the event streams always carry their partition as a hash tag,
    # so a stream and the keys beside it (its dead letters, the relay's mark) share a slot.
    # Off, REDIS_URL is one server and one partition keeps the plain ``<prefix>events``.
    redis_cluster: bool = False
    relay_enabled: bool = True
    relay_batch: int = 500
    # Acknowledged events stay this long in the stream (late readers, debugging). The stream
    # is a transport, not an archive: Redis memory is about event rate x retention, and the
    # outbox table keeps published events for a day.
    stream_retention_seconds: float = 3600.0
    stream_trim_interval: float = 60.0
    consumer_batch: int = 100
    consumer_block_ms: int = 2000
    consumer_claim_idle_ms: int = 30_000
    consumer_max_deliveries: int = 5
    consumer_concurrency: int = 8
    # A merge request whose event has not been applied after this long is applied by the
    # history worker straight from Postgres (promise 13).
    merge_pending_timeout: float = 60.0
    max_body_bytes: int = 64 * 1024
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # Failed API-key / admin-token attempts per client IP per minute; past it, that IP's
    # attempts get 429 before any key lookup (a key this process has seen work still passes).
    auth_failures_per_ip: int = 20
    # Reverse proxies in front of us that append to X-Forwarded-For (e.g. 1 behind an
    # ingress). 0: the header is ignored and the socket peer is the client (it is spoofable).
    trusted_proxy_hops: int = 0
    # GET /playground and its demo backend (all-in-one only): mints contact tokens for a demo
    # org to anyone who can reach the server, so never on unless asked for.
    playground: bool = False
    # OTLP/HTTP base URL of a trace collector; unset, tracing is off (shared.tracing).
    otel_exporter_otlp_endpoint: str | None = None
    # Defaults to ``widget-identity-<service>`` (e.g. widget-identity-history-consumer).
    otel_service_name: str | None = None

    @property
    def database_session_url(self) -> str:
        """Where a connection that needs its own Postgres session connects."""
        return self.database_direct_url or self.database_url

    @property
    def events_stream(self) -> str:
        """The one events stream's name when there is one partition (tests, the CLI's
        defaults); code that publishes or reads uses ``event_streams``."""
        return f"{self.stream_prefix}events"

    @property
    def event_streams(self) -> tuple[str, ...]:
        """Every partition's stream, in partition order (which subject goes where:
        shared.bus.partitions). One partition keeps the one stream's name; otherwise each
        name carries its partition as a Redis Cluster hash tag (``wi:events:{2}``), so the
        partitions spread over the shards and every key of one partition (its dead letters,
        its publish mark) sits in its slot. On a cluster even a lone partition is tagged."""
        if self.stream_partitions == 1 and not self.redis_cluster:
            return (self.events_stream,)
        return tuple(f"{self.events_stream}:{{{p}}}" for p in range(self.stream_partitions))

    def dead_letter_stream(self, group: str, stream: str | None = None) -> str:
        """Where ``group`` parks what it gives up on in ``stream`` (default: the one
        partition's): beside the stream, in its hash slot."""
        return f"{stream or self.event_streams[0]}:dlq:{group}"

    def dead_letter_pattern(self) -> str:
        """A SCAN pattern matching every group's dead letters of every partition."""
        return f"{self.events_stream}*:dlq:*"

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        # Every default is written once, on the field above; an unset variable takes it.
        defaults, limits = _Defaults(cls), _Defaults(RateLimits)
        redis_cluster = reader.get("REDIS_CLUSTER", _boolean, defaults.redis_cluster)
        settings = cls(
            database_url=reader.url("DATABASE_URL", _PG_SCHEMES),
            redis_url=(
                # A cluster client speaks TCP only, and may be given several seed nodes.
                reader.urls("REDIS_URL", _REDIS_CLUSTER_SCHEMES)
                if redis_cluster
                else reader.url("REDIS_URL", _REDIS_SCHEMES)
            ),
            redis_cluster=redis_cluster,
            database_direct_url=reader.optional_url("DATABASE_DIRECT_URL", _PG_SCHEMES),
            database_pool_mode=reader.get(
                "DATABASE_POOL_MODE",
                str.lower,
                defaults.database_pool_mode,
                check=lambda v: v in {"session", "transaction"},
            ),
            port=reader.get("PORT", int, defaults.port, check=lambda v: 0 <= v <= 65535),
            host=reader.get("HOST", str, defaults.host),
            admin_token=reader.optional_secret("ADMIN_TOKEN", min_length=16),
            key_encryption_key=reader.key("KEY_ENCRYPTION_KEY"),
            token_issuer=reader.get("TOKEN_ISSUER", str, defaults.token_issuer, check=bool),
            token_audience=reader.get("TOKEN_AUDIENCE", str, defaults.token_audience, check=bool),
            token_algorithms=reader.get(
                "TOKEN_ALGORITHMS",
                _algorithms,
                defaults.token_algorithms,
                check=lambda v: bool(v) and set(v) <= {"EdDSA", "ES256"},
            ),
            stream_prefix=reader.get("STREAM_PREFIX", str, defaults.stream_prefix),
            log_level=reader.get(
                "LOG_LEVEL",
                str.upper,
                defaults.log_level,
                check=lambda v: v in {"DEBUG", "INFO", "WARNING", "ERROR"},
            ),
            log_json=reader.get("LOG_JSON", _boolean, defaults.log_json),
            shutdown_timeout=reader.get(
                "SHUTDOWN_TIMEOUT", float, defaults.shutdown_timeout, check=_positive
            ),
            drain_delay=reader.get(
                "DRAIN_DELAY", float, defaults.drain_delay, check=lambda v: v >= 0
            ),
            widget_request_timeout=reader.get(
                "WIDGET_REQUEST_TIMEOUT", float, defaults.widget_request_timeout, check=_positive
            ),
            request_timeout=reader.get(
                "REQUEST_TIMEOUT", float, defaults.request_timeout, check=_positive
            ),
            admin_request_timeout=reader.get(
                "ADMIN_REQUEST_TIMEOUT", float, defaults.admin_request_timeout, check=_positive
            ),
            db_pool_min=reader.get(
                "DB_POOL_MIN", int, defaults.db_pool_min, check=lambda v: v >= 0
            ),
            db_pool_max=reader.get("DB_POOL_MAX", int, defaults.db_pool_max, check=_positive),
            db_acquire_timeout=reader.get(
                "DB_ACQUIRE_TIMEOUT", float, defaults.db_acquire_timeout, check=_positive
            ),
            db_lock_timeout=reader.get(
                "DB_LOCK_TIMEOUT", float, defaults.db_lock_timeout, check=_positive
            ),
            db_statement_timeout=reader.get(
                "DB_STATEMENT_TIMEOUT", float, defaults.db_statement_timeout, check=_positive
            ),
            redis_socket_timeout=reader.get(
                "REDIS_SOCKET_TIMEOUT", float, defaults.redis_socket_timeout, check=_positive
            ),
            redis_max_connections=reader.get(
                "REDIS_MAX_CONNECTIONS", int, defaults.redis_max_connections, check=_positive
            ),
            relay_enabled=reader.get("RELAY_ENABLED", _boolean, defaults.relay_enabled),
            stream_partitions=reader.get(
                "STREAM_PARTITIONS",
                int,
                defaults.stream_partitions,
                check=lambda v: 1 <= v <= 1024,
            ),
            consumer_lease_seconds=reader.get(
                "CONSUMER_LEASE_SECONDS",
                float,
                defaults.consumer_lease_seconds,
                check=lambda v: v >= 1,
            ),
            stream_retention_seconds=reader.get(
                # Not below a minute: the revocation listener XREADs the stream without a
                # group, so only time protects what it has not read yet.
                "STREAM_RETENTION_SECONDS",
                float,
                defaults.stream_retention_seconds,
                check=lambda v: v >= 60,
            ),
            consumer_max_deliveries=reader.get(
                "CONSUMER_MAX_DELIVERIES", int, defaults.consumer_max_deliveries, check=_positive
            ),
            consumer_claim_idle_ms=reader.get(
                "CONSUMER_CLAIM_IDLE_MS", int, defaults.consumer_claim_idle_ms, check=_positive
            ),
            merge_pending_timeout=reader.get(
                "MERGE_PENDING_TIMEOUT", float, defaults.merge_pending_timeout, check=_positive
            ),
            max_body_bytes=reader.get(
                "MAX_BODY_BYTES", int, defaults.max_body_bytes, check=_positive
            ),
            trusted_proxy_hops=reader.get(
                "TRUSTED_PROXY_HOPS", int, defaults.trusted_proxy_hops, check=lambda v: 0 <= v <= 10
            ),
            auth_failures_per_ip=reader.get(
                "AUTH_FAILURES_PER_IP", int, defaults.auth_failures_per_ip, check=_positive
            ),
            playground=reader.get("PLAYGROUND", _boolean, defaults.playground),
            otel_exporter_otlp_endpoint=reader.optional_url(
                "OTEL_EXPORTER_OTLP_ENDPOINT", ("http", "https")
            ),
            otel_service_name=reader.get(
                "OTEL_SERVICE_NAME",
                str,
                defaults.otel_service_name,
                check=lambda v: bool(v and v.strip()),
            ),
            rate_limits=RateLimits(
                authenticate_per_key=reader.get(
                    "RATE_AUTHENTICATE_PER_KEY", int, limits.authenticate_per_key, check=_positive
                ),
                sessions_per_ip=reader.get(
                    "RATE_SESSIONS_PER_IP", int, limits.sessions_per_ip, check=_positive
                ),
                sessions_per_widget_token=reader.get(
                    "RATE_SESSIONS_PER_WIDGET_TOKEN",
                    int,
                    limits.sessions_per_widget_token,
                    check=_positive,
                ),
                sessions_per_visitor=reader.get(
                    "RATE_SESSIONS_PER_VISITOR", int, limits.sessions_per_visitor, check=_positive
                ),
            ),
        )
        if settings.database_pool_mode == "transaction" and not settings.database_direct_url:
            # Through a transaction pooler the relay's leader lock would stay behind on a
            # server connection other clients get, and its LISTEN would hear nothing.
            raise ConfigError(
                "DATABASE_DIRECT_URL: required with DATABASE_POOL_MODE=transaction (migrations"
                " and the outbox relay need a Postgres session of their own)"
            )
        if settings.redis_cluster and (
            "{" in settings.stream_prefix or "}" in settings.stream_prefix
        ):
            # The stream names carry their partition as the hash tag: a brace in the prefix
            # would make another tag, and put every partition on one slot.
            raise ConfigError("STREAM_PREFIX: no braces on a Redis Cluster (they make hash tags)")
        if settings.db_pool_min > settings.db_pool_max:
            raise ConfigError("DB_POOL_MIN: must not exceed DB_POOL_MAX")
        if settings.drain_delay >= settings.shutdown_timeout:
            # The drain delay is spent out of the shutdown budget: nothing would be left.
            raise ConfigError("DRAIN_DELAY: must be below SHUTDOWN_TIMEOUT")
        return settings


class _Defaults:
    """A dataclass's field defaults by attribute, read without building an instance (Settings
    has required fields)."""

    def __init__(self, cls: type) -> None:
        self._values = {
            f.name: f.default_factory() if f.default_factory is not MISSING else f.default
            for f in fields(cls)
            if f.default is not MISSING or f.default_factory is not MISSING
        }

    def __getattr__(self, name: str) -> Any:
        return self._values[name]


def _positive(value: float) -> bool:
    return value > 0


def _algorithms(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(
        self,
        name: str,
        parse: Callable[[str], T],
        default: T,
        *,
        check: Callable[[T], object] | None = None,
    ) -> T:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: cannot parse {raw!r} ({exc})") from None
        if check is not None and not check(value):
            raise ConfigError(f"{name}: {raw!r} is out of range")
        return value

    def url(self, name: str, schemes: tuple[str, ...], *, raw: str | None = None) -> str:
        raw = (self._env.get(name, "") if raw is None else raw).strip()
        if not raw:
            raise ConfigError(f"{name}: not set (expected a {schemes[0]}:// URL)")
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - evaluating it validates the port number
        except ValueError as exc:
            raise ConfigError(f"{name}: malformed URL ({exc})") from None
        if parts.scheme not in schemes:
            raise ConfigError(
                f"{name}: scheme {parts.scheme or '(none)'!r} is not one of {', '.join(schemes)}"
            )
        return raw

    def urls(self, name: str, schemes: tuple[str, ...]) -> str:
        """One URL or several, comma-separated, each with a host; returned as given (minus
        blanks around the commas)."""
        parts = [part.strip() for part in self._env.get(name, "").split(",") if part.strip()]
        for part in parts:
            self.url(name, schemes, raw=part)
            if not urlsplit(part).hostname:
                raise ConfigError(f"{name}: {part!r} names no host")
        if not parts:
            self.url(name, schemes)  # says what is missing
        return ",".join(parts)

    def optional_url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        if not self._env.get(name, "").strip():
            return None
        return self.url(name, schemes)

    def optional_secret(self, name: str, *, min_length: int) -> str | None:
        raw = self._env.get(name)
        if not raw:
            return None
        if len(raw) < min_length:
            raise ConfigError(f"{name}: too short (at least {min_length} characters)")
        return raw

    def key(self, name: str) -> bytes | None:
        raw = self._env.get(name)
        if not raw:
            return None
        try:
            key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            raise ConfigError(f"{name}: not base64") from None
        if len(key) != 32:
            raise ConfigError(f"{name}: must decode to 32 bytes, got {len(key)}")
        return key


# Every app carries its settings under this key (the process layer and every wing read it).
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
