"""The history service's SQL, one module per thing it reads or writes:

- ``scopes``: sessions and visitors, read through session resolution's published views;
- ``conversation_rows``: recording conversations and messages;
- ``merge_rows``: merge records and the moves that re-point conversations, and login merge
  requests not applied yet (through session resolution's view ``login_merge_requests``);
- ``locks``: the advisory scope locks and the contact row locks merges take.

Reading a scope's history page is ``shared.scope_history`` (session resolution reads it
too); erasure's SQL, the one place history writes other services' tables, is in
``services.history.erasure``. The contact-row reads and locks shared with token issuance are
in ``shared.identity.contacts``.

Lock order, shared by everything that moves or removes history so no two transactions can
wait on each other in a cycle: the merge row, then the scope advisory locks (sorted by key),
then contact rows (sorted by id), then conversations, then the outbox's subject_seqs row.
Erasure starts at the contact row (it takes no advisory lock), which keeps it in that order.
"""

from __future__ import annotations

from typing import TypeAlias

import asyncpg

Db: TypeAlias = asyncpg.Pool | asyncpg.Connection
Row: TypeAlias = asyncpg.Record
