"""Which partition a subject's events go to: a stable hash of the subject, the same in Python
and in SQL, so every writer (and a reader that wants one subject) agrees, whatever process or
language it is.

The hash is the first 32 bits of the subject's MD5, modulo the partition count. MD5 is not
here for secrecy: it is stable across versions, platforms and both languages (Postgres's own
``hashtext`` is documented as internal), and spreads any kind of id evenly. Changing the count
moves most subjects to another partition, so a running deployment changes it only after
draining (docs/architecture.md, "Partitions").
"""

from __future__ import annotations

import hashlib


def partition_of(subject: str, partitions: int) -> int:
    """The partition (0-based) that ``subject``'s events go to."""
    if partitions == 1:
        return 0
    digest = hashlib.md5(subject.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big") % partitions


def partition_sql(subject: str, partitions: str) -> str:
    """The SQL expression ``partition_of`` computes: ``subject`` and ``partitions`` are SQL
    expressions (a text column, an integer parameter). ``bit(32)::bigint`` reads the 32 bits
    unsigned, like ``int.from_bytes``."""
    return f"((('x' || substr(md5({subject}), 1, 8))::bit(32)::bigint % ({partitions}))::int)"


def stream_of(subject: str, streams: tuple[str, ...]) -> str:
    """The stream of ``streams`` (every partition's, in order) that carries ``subject``."""
    return streams[partition_of(subject, len(streams))]
