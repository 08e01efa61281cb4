"""The partial ``/send_join`` answer, checked before Synapse checks it.

Between receiving the answer and Synapse's own checks of its events (before
``/join`` returns): wait for the signing keys the resident's ``/make_join`` hint
named (:class:`~synapse_partial_state.joining.keys.JoinKeyPrefetch`), then check
the signatures and hashes of every event in bulk (``verify.py``, in a thread: a
few hundred events) with the keys stored. Synapse's per-event check (a trip
through the keyring's batching queue and its Deferreds per event, on the reactor:
0.2-0.6 s for the 174 events of a 10,000-member room's answer on a loaded
machine) then runs only for the events the bulk check could not vouch for (a key
not stored, a hash mismatch that Synapse answers by redacting, a third-party
invite), as the resync's bulk check does; and not at all where Synapse's
per-event check does more than signatures and hashes (a spam-checker module, a
policy server).

The wait is in two steps. A module resident's answer carries the MSC2775
essentials: a few hundred member events (heroes, power users, bans, invites)
signed by as many servers, which the joiner's clients want early but the join
does not need. The join fetches the keys of the first servers its hint names
(:data:`~synapse_partial_state.joining.keys.JOIN_KEY_MAX_SERVERS`: those the
join needs, then those of the essentials by priority) and waits for them
``resync.essentials_key_wait_seconds`` at most; an essential whose event, or an
event of its auth chain, has no keys then is taken out of the answer with what
only it needs (:func:`answer_needs`): the join's partial state goes without it,
and the resync brings it with the rest of the room. Measured at 100,000
members over 2,000 servers (the benchmark's real joiner, 250 servers named): the
keys of all took 2.9 s to fetch, the answer 0.8 s to arrive, and ``/join``
waited 2.2 s more for them. What the join needs (its auth events, the
non-member state, our own users' memberships, and their auth chains) is waited
for as before, up to :data:`~synapse_partial_state.joining.keys.JOIN_KEY_WAIT_S`,
then left to Synapse's own check, which fetches what is still missing; so is
everything when the resident named no servers (a stock resident).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Container, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attr

from synapse_partial_state.compat.runtime import make_deferred_yieldable
from synapse_partial_state.compat.state_fetch import StateFetchOps, uses_v1_event_ids
from synapse_partial_state.joining import verify
from synapse_partial_state.joining.keys import (
    JOIN_EXTRAS_WAIT_S,
    JOIN_KEY_WAIT_S,
    JoinKeyPrefetch,
)

if TYPE_CHECKING:
    from synapse.api.room_versions import RoomVersion
    from synapse.events import EventBase

logger = logging.getLogger(__name__)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class JoinCheckOutcome:
    """``vouched``: the events whose signatures and hashes were checked here;
    ``left_out``: the IDs of the events to take out of the answer (essentials
    whose keys did not come in time, and what only they need)."""

    vouched: Collection[EventBase] = ()
    left_out: frozenset[str] = frozenset()


def _closure(
    roots: Iterable[str], by_id: Mapping[str, EventBase], within: Container[str]
) -> set[str]:
    """``roots`` and their auth events, transitively, among the events of
    ``by_id`` that are in ``within``."""
    found: set[str] = set()
    todo = [r for r in roots if r in within]
    while todo:
        event_id = todo.pop()
        if event_id in found:
            continue
        found.add(event_id)
        event = by_id.get(event_id)
        if event is not None:
            todo.extend(a for a in event.auth_event_ids() if a in within)
    return found


@attr.s(auto_attribs=True, frozen=True, slots=True)
class AnswerNeeds:
    """The events of a partial answer, by what needs them. ``required``: the
    join's auth events, the non-member state and our own users' memberships,
    with their auth chains; ``optional``: the other member events of the state
    (the essentials), each with the events only it needs (its auth chain
    outside ``required``)."""

    required: frozenset[str]
    optional: Mapping[str, frozenset[str]]

    def left_out(self, waiting: Container[str]) -> set[str]:
        """What to take out of the answer when the events ``waiting`` have no
        keys: every optional member needing one of them, and what only those
        need (never a required event: Synapse's own check fetches its keys)."""
        kept: set[str] = set(self.required)
        dropped: set[str] = set()
        for needs in self.optional.values():
            if any(event_id in waiting for event_id in needs):
                dropped |= needs
            else:
                kept |= needs
        return dropped - kept


def answer_needs(
    state: Iterable[EventBase],
    auth_chain: Iterable[EventBase],
    joins: Iterable[EventBase],
    own_server: str,
) -> AnswerNeeds:
    """Which events of a partial answer (``state``, ``auth_chain``, for
    ``joins``) the join needs, and which the essentials alone need."""
    state = list(state)
    by_id = {event.event_id: event for event in (*state, *auth_chain)}
    roots: list[str] = []
    for join in joins:
        roots.extend(join.auth_event_ids())
    members: list[str] = []
    for event in state:
        state_key = getattr(event, "state_key", None)
        if (
            event.type == "m.room.member"
            and isinstance(state_key, str)
            and not state_key.endswith(":" + own_server)
        ):
            members.append(event.event_id)
        else:
            roots.append(event.event_id)
    required = _closure(roots, by_id, by_id)
    rest = {event_id for event_id in by_id if event_id not in required}
    optional = {
        member: frozenset(_closure([member], by_id, rest))
        for member in members
        if member not in required
    }
    return AnswerNeeds(frozenset(required), optional)


def has_keys(
    pdu: Mapping[str, Any],
    keys: Mapping[tuple[str, str], Any],
    v1_event_ids: bool,
    restricted: bool,
) -> bool:
    """Whether a key is stored for every server whose signature ``pdu`` needs
    (one of each server's signing keys is enough); True when that is for
    Synapse's own check to say (a third-party invite, a malformed pdu)."""
    servers = verify.required_servers(pdu, v1_event_ids, restricted)
    signatures = pdu.get("signatures")
    if not servers or not isinstance(signatures, Mapping):
        return True
    for server in servers:
        by_key = signatures.get(server)
        if not isinstance(by_key, Mapping):
            return True  # unsigned: Synapse's check rejects it
        if not any((server, key_id) in keys for key_id in by_key):
            return False
    return True


class JoinCheck:
    def __init__(
        self,
        prefetch: JoinKeyPrefetch,
        pool: verify.VerifierPool | None,
        ops: StateFetchOps | None,
        own_server: str,
        essentials_wait_s: float = JOIN_EXTRAS_WAIT_S,
    ) -> None:
        self._own_server = own_server
        self._essentials_wait_s = essentials_wait_s
        self._prefetch = prefetch
        self._pool = pool
        self._ops = ops

    async def before_check(
        self,
        room_id: str,
        room_version: RoomVersion,
        state: list[EventBase],
        auth_chain: list[EventBase],
        join: Collection[EventBase],
        partial: bool,
    ) -> JoinCheckOutcome:
        """Once an answer has arrived (``state`` and ``auth_chain``, for
        ``join``; ``partial``: members omitted): what was checked here, and
        what to take out of it (nothing from a full state)."""
        events = [*state, *auth_chain]
        pool, ops = self._pool, self._ops
        if ops is None or not events:
            await self._prefetch.wait(room_id, JOIN_KEY_WAIT_S)
            return JoinCheckOutcome()
        over = await self._prefetch.wait(
            room_id, self._essentials_wait_s if partial else JOIN_KEY_WAIT_S
        )
        v1_ids = uses_v1_event_ids(room_version)
        restricted = room_version.restricted_join_rule
        pdus = [event.get_pdu_json() for event in events]
        wanted: set[tuple[str, str]] = set()
        for pdu in pdus:
            wanted.update(verify.key_ids_needed(pdu, v1_ids, restricted))
        keys = await ops.signing_keys(wanted)

        def without_keys() -> set[str]:
            return {
                event.event_id
                for event, pdu in zip(events, pdus, strict=True)
                if not has_keys(pdu, keys, v1_ids, restricted)
            }

        left_out: set[str] = set()
        if partial and self._prefetch.hinted(room_id):
            needs = answer_needs(state, auth_chain, join, self._own_server)
            waiting = without_keys()
            if not over and not waiting.isdisjoint(needs.required):
                # The join needs some of them: as long as it takes.
                await self._prefetch.wait(room_id, JOIN_KEY_WAIT_S)
                keys = await ops.signing_keys(wanted)
                waiting = without_keys()
            left_out = needs.left_out(waiting)
        if left_out:
            logger.info(
                "Join of %s: %d member event(s) of the essentials left to the "
                "resync, with %d event(s) only they need (signing keys not "
                "fetched in time)",
                room_id,
                sum(1 for event in state if event.event_id in left_out),
                sum(1 for event in auth_chain if event.event_id in left_out),
            )
        if pool is None or await ops.needs_per_event_checks(room_id):
            return JoinCheckOutcome(left_out=frozenset(left_out))
        kept = [
            (event, pdu)
            for event, pdu in zip(events, pdus, strict=True)
            if event.event_id not in left_out
        ]
        vouched: list[EventBase] = []
        for start, pending in pool.verify_chunks(
            room_version.identifier, [pdu for _, pdu in kept], keys, use_workers=False
        ):
            verdicts = await make_deferred_yieldable(pending)
            chunk = kept[start : start + len(verdicts)]
            for (event, _), (verdict, event_id) in zip(chunk, verdicts, strict=True):
                if verdict == verify.OK and event_id == event.event_id:
                    vouched.append(event)
        logger.info(
            "Join of %s: %d of the %d events of the /send_join answer checked in "
            "bulk (the rest by Synapse, one by one)",
            room_id,
            len(vouched),
            len(kept),
        )
        return JoinCheckOutcome(vouched, frozenset(left_out))
