"""``/members`` and ``/joined_members`` of a partial-state room: the policy
``clients.members_during_resync``.

* ``block`` (the default): Synapse's own behaviour, and the spec tests': the
  request waits until the room's state is complete;
* ``partial``: for an *unencrypted* room, the request answers at once with the
  members known so far (Synapse's own answer, computed from the partial state,
  with its own access rules), marked ``"org.matrix.msc2775.syncing": true`` and
  with the room's member counts (``"org.matrix.msc2775.summary"``). An encrypted
  room always blocks: a client that encrypts for a partial member list leaves the
  members it does not know unable to decrypt.

Pure policy plus reads through :class:`~..compat.clients.ClientOps`;
:mod:`..compat.members` calls it from Synapse's servlets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from synapse_partial_state.config import MEMBERS_PARTIAL, ClientsConfig
from synapse_partial_state.wire import SUMMARY_FIELD, SYNCING_FIELD

if TYPE_CHECKING:
    from synapse_partial_state.compat.clients import MemberSummary


class MemberFacts(Protocol):
    """What the policy reads from Synapse (:class:`~..compat.clients.ClientOps`)."""

    async def is_partial_state(self, room_id: str) -> bool: ...

    async def is_encrypted(self, room_id: str) -> bool: ...

    async def member_summary(self, room_id: str, user_id: str) -> MemberSummary: ...


def answers_at_once(policy: str, is_partial: bool, encrypted: bool) -> bool:
    """Whether a members request answers from the partial state (else: stock's,
    which waits for full state while the room is partial)."""
    return policy == MEMBERS_PARTIAL and is_partial and not encrypted


def mark_members(body: dict[str, Any], summary: MemberSummary) -> None:
    """Mark an answer built from the partial state: syncing, and the counts."""
    body[SYNCING_FIELD] = True
    body[SUMMARY_FIELD] = {
        "m.joined_member_count": summary.joined_member_count,
        "m.invited_member_count": summary.invited_member_count,
    }


class MembersDuringResync:
    """The policy, with the facts it needs (see the module docstring)."""

    def __init__(self, config: ClientsConfig, facts: MemberFacts) -> None:
        self._policy = config.members_during_resync
        self._facts = facts

    async def answers_at_once(self, room_id: str) -> bool:
        """Whether a members request for ``room_id`` answers from partial state
        (no read at all with the default ``block``)."""
        if self._policy != MEMBERS_PARTIAL:
            return False
        if not await self._facts.is_partial_state(room_id):
            return False
        encrypted = await self._facts.is_encrypted(room_id)
        return answers_at_once(self._policy, True, encrypted)

    async def mark(self, body: dict[str, Any], room_id: str) -> None:
        """Add the marker and the counts to an answer built from partial state
        (the counts do not depend on who asks: no user for the heroes)."""
        mark_members(body, await self._facts.member_summary(room_id, ""))
