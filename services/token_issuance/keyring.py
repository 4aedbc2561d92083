"""The signer's in-process cache of decrypted private keys: decrypt once, sign many times.

Each org signs with its newest live key. Entries live ``ttl`` seconds, so a rotation made by
another replica is picked up within that time (until then the older key keeps signing, and
it keeps verifying: rotation never breaks anyone). Deletions are dropped at once: locally by
the deleting call, on other replicas through the revocation channel (``forget_kid``).
"""

from __future__ import annotations

import time

from services.token_issuance import queries
from services.token_issuance.signing_keys import SigningKey, decrypt_private_key
from shared.errors import ConfigError, Problem


class Keyring:
    def __init__(self, kek: bytes | None, *, ttl: float = 60.0, max_entries: int = 10_000) -> None:
        self._kek = kek
        self._ttl = ttl
        self._max = max_entries
        self._current: dict[str, tuple[float, SigningKey]] = {}
        self.loads = 0  # DB reads + decryptions; stays flat under load

    @property
    def kek(self) -> bytes:
        if self._kek is None:
            raise ConfigError("KEY_ENCRYPTION_KEY: not set (32 random bytes, base64)")
        return self._kek

    async def current(self, db: queries.Executor, org_id: str) -> SigningKey:
        now = time.monotonic()
        cached = self._current.get(org_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        self.loads += 1
        row = await queries.newest_signing_key(db, org_id)
        if row is None:
            raise Problem(
                409, "no_signing_key", "the org has no live signing key; rotate to create one"
            )
        key = SigningKey(
            kid=row["kid"],
            org_id=org_id,
            alg=row["alg"],
            private_key=decrypt_private_key(self.kek, row["kid"], row["private_key_enc"]),
            created_at=row["created_at"],
        )
        if len(self._current) >= self._max:
            self._current.pop(next(iter(self._current)))
        self._current[org_id] = (now + self._ttl, key)
        return key

    async def check_kek(self, db: queries.Executor) -> None:
        """Start-up check: the key-encryption key is set and opens the stored keys."""
        kek = self.kek
        row = await queries.any_signing_key(db)
        if row is not None:
            decrypt_private_key(kek, row["kid"], row["private_key_enc"])

    def forget_org(self, org_id: str) -> None:
        self._current.pop(org_id, None)

    def forget_kid(self, kid: str) -> None:
        for org_id, (_, key) in list(self._current.items()):
            if key.kid == kid:
                self._current.pop(org_id, None)
