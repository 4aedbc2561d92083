"""Redis Cluster hash tags: names for keys that one command or transaction touches together.

A cluster stores each key on one of 16384 slots, by a hash of its name, or only of the part
between the first ``{`` and the first ``}`` after it (its *hash tag*) when that part is not
empty. A command, script or MULTI whose keys lie on different slots fails with CROSSSLOT, so
keys used together must share a tag. Only such keys get one: a key used alone hashes whole,
and keys spread over the cluster.
"""

from __future__ import annotations


def hash_tag(key: str) -> str | None:
    """The part of ``key`` its slot is computed from when not the whole key, or None."""
    start = key.find("{")
    if start == -1:
        return None
    end = key.find("}", start + 1)
    return key[start + 1 : end] if end > start + 1 else None


def beside(key: str, suffix: str) -> str:
    """A name on the same slot as ``key`` that starts with ``key`` + ``suffix``: that alone
    when ``key`` has a hash tag (the name keeps it), else followed by ``{key}``, a tag that is
    all of ``key``: ``wi:events:published{wi:events}`` lies beside ``wi:events``. The name
    still starts with ``key``, so whatever finds a deployment's keys by their prefix (SCAN
    MATCH ``wi:*``) finds these too."""
    if "{" in suffix or "}" in suffix:
        raise ValueError(f"{suffix!r}: a suffix with braces would change the hash tag")
    if hash_tag(key) is not None:
        return key + suffix
    if "{" in key or "}" in key:
        # Appending "{key}" would start or end the tag at one of these braces.
        raise ValueError(f"{key!r}: braces that make no hash tag cannot be kept on one slot")
    return f"{key}{suffix}{{{key}}}"
