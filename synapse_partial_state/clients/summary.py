"""The room summary while a room is partial: the resident's, from ``/send_join``.

A partial-state room's member list is only the members known so far, so a
summary computed from it is wrong (a 10,000-member room looks like a room of a
few). A module resident adds its own summary to its partial ``/send_join``
answer (``org.matrix.msc2775.summary``: heroes, joined and invited counts,
after the join). The joiner keeps it (:mod:`..compat.join_summary` reads it off
the answer; :class:`JoinSummaries` stores it in the background, so the join does
not wait) and, while the room is partial and that join is the room's partial
join, answers with it (the progress endpoint, the members policy's counts).
Otherwise (a stock resident, another join since): the summary computed locally.

Pure parsing (:func:`parse_summary`, :func:`for_user`) plus the store.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import attr

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi
    from synapse.storage.database import LoggingTransaction

    from synapse_partial_state.joining.store import JobStore

logger = logging.getLogger(__name__)

#: Most heroes kept (clients show up to five; Synapse computes five).
MAX_HEROES = 5
#: Longest user ID (the spec's 255).
MAX_USER_ID_LENGTH = 255


@attr.s(frozen=True, auto_attribs=True, slots=True)
class ResidentSummary:
    """The resident's summary, checked."""

    heroes: tuple[str, ...]
    joined_member_count: int
    invited_member_count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "m.heroes": list(self.heroes),
            "m.joined_member_count": self.joined_member_count,
            "m.invited_member_count": self.invited_member_count,
        }


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def parse_summary(raw: Any) -> ResidentSummary | None:
    """The summary block of a ``/send_join`` answer, or None if it is not one
    (then the local summary is used): counts non-negative integers, heroes a
    list of user IDs (at most :data:`MAX_HEROES` kept)."""
    if not isinstance(raw, dict):
        return None
    joined = _count(raw.get("m.joined_member_count"))
    invited = _count(raw.get("m.invited_member_count", 0))
    heroes = raw.get("m.heroes", [])
    if joined is None or invited is None or not isinstance(heroes, list):
        return None
    if not all(
        isinstance(h, str) and h.startswith("@") and len(h) <= MAX_USER_ID_LENGTH
        for h in heroes
    ):
        return None
    unique = tuple(dict.fromkeys(heroes))
    return ResidentSummary(unique[: MAX_HEROES + 1], joined, invited)


def for_user(summary: ResidentSummary, user_id: str) -> ResidentSummary:
    """The summary as ``user_id`` sees it: never among its own heroes."""
    heroes = tuple(h for h in summary.heroes if h != user_id)[:MAX_HEROES]
    return attr.evolve(summary, heroes=heroes)


def _save_txn(
    txn: LoggingTransaction, room_id: str, join_event_id: str, body: str, ts: int
) -> None:
    txn.execute("DELETE FROM sps_join_summaries WHERE room_id = ?", (room_id,))
    txn.execute(
        "INSERT INTO sps_join_summaries (room_id, join_event_id, summary, stored_ts)"
        " VALUES (?, ?, ?, ?)",
        (room_id, join_event_id, body, ts),
    )


def _forget_txn(txn: LoggingTransaction, room_id: str) -> None:
    txn.execute("DELETE FROM sps_join_summaries WHERE room_id = ?", (room_id,))


def _get_txn(txn: LoggingTransaction, room_id: str) -> tuple[str, str] | None:
    txn.execute(
        "SELECT join_event_id, summary FROM sps_join_summaries WHERE room_id = ?",
        (room_id,),
    )
    row = txn.fetchone()
    return (row[0], row[1]) if row else None


class JoinSummaries:
    """The resident summaries this server received, one per room (the latest
    partial join), in ``sps_join_summaries``."""

    def __init__(self, api: ModuleApi, jobs: JobStore) -> None:
        self._api = api
        self._jobs = jobs  # owns the schema

    def on_summary(self, room_id: str, join_event_id: str, raw: Any) -> None:
        """From the ``/send_join`` parser: store a valid summary in the
        background (the join goes on at once)."""
        summary = parse_summary(raw)
        if summary is None:
            logger.info("Ignoring a malformed summary in /send_join of %s", room_id)
            return
        self._api.run_as_background_process(
            "sps_store_join_summary", self.save, room_id, join_event_id, summary
        )

    async def save(
        self, room_id: str, join_event_id: str, summary: ResidentSummary
    ) -> None:
        await self._jobs.ensure_schema()
        body = json.dumps(summary.to_json())
        now = int(time.time() * 1000)
        await self._api.run_db_interaction(
            "sps_save_join_summary", _save_txn, room_id, join_event_id, body, now
        )

    async def forget(self, room_id: str) -> None:
        """Drop the room's summary: its resync is complete (Synapse's own
        summary is exact from then on) or the room was given up."""
        await self._jobs.ensure_schema()
        await self._api.run_db_interaction(
            "sps_forget_join_summary", _forget_txn, room_id
        )

    async def get(self, room_id: str, join_event_id: str) -> ResidentSummary | None:
        """The summary received with ``join_event_id``, if any."""
        await self._jobs.ensure_schema()
        row = await self._api.run_db_interaction(
            "sps_get_join_summary", _get_txn, room_id
        )
        if row is None or row[0] != join_event_id:
            return None
        try:
            return parse_summary(json.loads(row[1]))
        except ValueError:
            return None
