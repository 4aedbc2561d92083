"""Private PostgreSQL and Redis servers for development (`make run`) and tests (`make test`).

Both servers listen on Unix sockets only, in a short-lived directory under /tmp, so they never
collide with servers the machine already runs on 5432/6379 and need no free TCP port.

Shutdown guarantees, strongest first:
- leaving `dev_servers()` (normally, by exception or KeyboardInterrupt) stops both servers
  (Postgres fast shutdown = what `pg_ctl stop -m fast` sends; Redis SIGTERM, which with
  `save ""` is SHUTDOWN NOSAVE plus an AOF flush) and removes the temporary directory;
- if our process dies abruptly (SIGKILL, OOM), Linux delivers PR_SET_PDEATHSIG to both
  servers, which are our direct children (the postgres binary is started itself, not via
  pg_ctl, which would detach it): Postgres gets SIGINT (fast shutdown), Redis SIGTERM.  This
  is armed only when started from the main thread, because the kernel ties it to the thread
  that forked, not to the process;
- whatever is still left (no PDEATHSIG, or a temp dir of a killed run) is cleaned up by the
  next start: an orphan server on a persistent data dir is stopped, stale pid files removed,
  and leftover /tmp/wi-* directories of dead owners deleted.
"""

from __future__ import annotations

from .cli import main
from .directories import ensure_free
from .errors import DevStackError
from .pgbouncer import PgBouncer, pgbouncer
from .redis import ThrowawayRedis
from .redis_cluster import ThrowawayCluster, throwaway_cluster
from .servers import DevServers, dev_servers, throwaway_redis

__all__ = [
    "DevServers",
    "DevStackError",
    "PgBouncer",
    "ThrowawayCluster",
    "ThrowawayRedis",
    "dev_servers",
    "ensure_free",
    "main",
    "pgbouncer",
    "throwaway_cluster",
    "throwaway_redis",
]
