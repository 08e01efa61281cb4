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
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from synapse_partial_state.compat.runtime import make_deferred_yieldable
from synapse_partial_state.compat.state_fetch import StateFetchOps, uses_v1_event_ids
from synapse_partial_state.joining import verify
from synapse_partial_state.joining.keys import JoinKeyPrefetch

if TYPE_CHECKING:
    from synapse.api.room_versions import RoomVersion
    from synapse.events import EventBase

logger = logging.getLogger(__name__)


class JoinCheck:
    def __init__(
        self,
        prefetch: JoinKeyPrefetch,
        pool: verify.VerifierPool | None,
        ops: StateFetchOps | None,
    ) -> None:
        self._prefetch = prefetch
        self._pool = pool
        self._ops = ops

    async def before_check(
        self, room_id: str, room_version: RoomVersion, events: list[EventBase]
    ) -> Collection[EventBase]:
        """Once the answer has arrived: the events whose signatures and hashes
        were checked here (Synapse's own check takes the others)."""
        await self._prefetch.before_check(room_id)
        pool, ops = self._pool, self._ops
        if pool is None or ops is None or not events:
            return ()
        if await ops.needs_per_event_checks(room_id):
            return ()
        v1_ids = uses_v1_event_ids(room_version)
        restricted = room_version.restricted_join_rule
        pdus = [event.get_pdu_json() for event in events]
        wanted: set[tuple[str, str]] = set()
        for pdu in pdus:
            wanted.update(verify.key_ids_needed(pdu, v1_ids, restricted))
        keys = await ops.signing_keys(wanted)
        vouched: list[EventBase] = []
        for start, pending in pool.verify_chunks(
            room_version.identifier, pdus, keys, use_workers=False
        ):
            verdicts = await make_deferred_yieldable(pending)
            chunk = events[start : start + len(verdicts)]
            for event, (verdict, event_id) in zip(chunk, verdicts, strict=True):
                if verdict == verify.OK and event_id == event.event_id:
                    vouched.append(event)
        logger.info(
            "Join of %s: %d of the %d events of the /send_join answer checked in "
            "bulk (the rest by Synapse, one by one)",
            room_id,
            len(vouched),
            len(events),
        )
        return vouched
