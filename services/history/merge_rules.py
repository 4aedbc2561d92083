"""Merge rules, with no I/O: what a valid merge request is, which scope locks a move takes,
and when the contacts involved forbid it.

A merge re-points every conversation of a source scope (a visitor, or a contact + externalId)
to a target contact scope; nothing is copied, so a conversation is always in exactly one
scope. Merges into or out of an erased contact fail: erasure is final, and no replay can
bring the data back.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import asyncpg

from shared.bus.events import MergeRequestedData
from shared.errors import WidgetIdentityError

REASONS = frozenset({"login", "admin"})
MAX_EXTERNAL_ID = 256

# A visitor or a contact: ("visitor" | "contact", id).
Entity = tuple[str, str]


class InvalidMergeRequest(WidgetIdentityError):
    """The event can never be applied (malformed ids, no or two sources): dead-letter it."""


def _optional_uuid(value: str | None, what: str) -> str | None:
    return None if value is None else _uuid(value, what)


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidMergeRequest(f"{what} is not a UUID: {value!r}") from None


@dataclass(frozen=True, slots=True)
class MergeSpec:
    merge_id: str
    org_id: str
    reason: str
    source_visitor_id: str | None
    source_contact_id: str | None
    source_external_id: str
    target_contact_id: str
    target_external_id: str

    @classmethod
    def from_event(cls, org_id: str, data: MergeRequestedData) -> MergeSpec:
        if (data.source_visitor_id is None) == (data.source_contact_id is None):
            raise InvalidMergeRequest("exactly one of sourceVisitorId / sourceContactId is needed")
        if data.reason not in REASONS or (
            data.reason == "admin" and data.source_contact_id is None
        ):
            raise InvalidMergeRequest(f"reason {data.reason!r} does not fit this merge")
        if data.source_visitor_id is not None and data.source_external_id:
            raise InvalidMergeRequest("a visitor scope has no externalId")
        for external_id in (data.source_external_id, data.target_external_id):
            if len(external_id) > MAX_EXTERNAL_ID or "\x00" in external_id:
                raise InvalidMergeRequest("externalId is too long or contains NUL")
        return cls(
            merge_id=_uuid(data.merge_id, "mergeId"),
            org_id=_uuid(org_id, "orgId"),
            reason=data.reason,
            source_visitor_id=_optional_uuid(data.source_visitor_id, "sourceVisitorId"),
            source_contact_id=_optional_uuid(data.source_contact_id, "sourceContactId"),
            source_external_id=data.source_external_id,
            target_contact_id=_uuid(data.target_contact_id, "targetContactId"),
            target_external_id=data.target_external_id,
        )

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> MergeSpec:
        def text(value: object) -> str | None:
            return None if value is None else str(value)

        return cls(
            merge_id=str(row["id"]),
            org_id=str(row["org_id"]),
            reason=row["reason"],
            source_visitor_id=text(row["source_visitor_id"]),
            source_contact_id=text(row["source_contact_id"]),
            source_external_id=row["source_external_id"],
            target_contact_id=str(row["target_contact_id"]),
            target_external_id=row["target_external_id"],
        )

    @property
    def source_entity(self) -> Entity:
        if self.source_visitor_id is not None:
            return ("visitor", self.source_visitor_id)
        assert self.source_contact_id is not None
        return ("contact", self.source_contact_id)

    @property
    def target_entity(self) -> Entity:
        return ("contact", self.target_contact_id)

    @property
    def contact_ids(self) -> list[str]:
        ids = {self.target_contact_id}
        if self.source_contact_id is not None:
            ids.add(self.source_contact_id)
        return sorted(ids)

    def same_scope(self) -> bool:
        return (
            self.source_contact_id == self.target_contact_id
            and self.source_external_id == self.target_external_id
        )


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    status: str  # done | failed | skipped (already applied, or not this org's)
    moved: int = 0


def lock_key(kind: str, entity_id: str) -> int:
    """A stable signed 64-bit advisory-lock key for a visitor or contact (any process, any
    language computes the same one)."""
    digest = hashlib.blake2b(f"wi:history:{kind}:{entity_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def scope_locks(moves: Iterable[tuple[Entity, Entity]]) -> list[tuple[int, bool]]:
    """The advisory locks (key, shared) that moves (into, out of) take, in the order to take
    them: serialise moves that could interleave badly, without serialising harmless ones.

    Moving history out of an entity takes its lock exclusively; moving history into one takes
    it shared. Merges into one contact therefore do not wait for each other here (only,
    briefly, on the contact's event sequence row as they commit), while a merge out of X waits
    for every merge into X and vice versa, so crossing merges (A->B with B->A) and chains
    (A->B with B->C) run one after the other as if sequential. Keys are taken in sorted
    order, so no two transactions ever wait on each other in a cycle.
    """
    moves = list(moves)
    modes: dict[int, bool] = {}
    for into, _ in moves:
        modes.setdefault(lock_key(*into), True)
    for _, out_of in moves:
        modes[lock_key(*out_of)] = False
    return sorted(modes.items())


def contact_problem(spec: MergeSpec, live: Mapping[str, bool]) -> str | None:
    """Why the merge's contacts (``live``: contact id -> not erased, for those that exist)
    forbid it, or None."""
    problem = _contact_problem(live, spec.target_contact_id, "target")
    if problem is None and spec.source_contact_id is not None:
        problem = _contact_problem(live, spec.source_contact_id, "source")
    return problem


def _contact_problem(live: Mapping[str, bool], contact_id: str, role: str) -> str | None:
    if contact_id not in live:
        return f"{role} contact {contact_id} not found"
    if not live[contact_id]:
        return f"{role} contact {contact_id} was erased"
    return None
