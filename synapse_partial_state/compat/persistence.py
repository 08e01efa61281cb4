"""The persistence seam: a room's current state is never recalculated from
partial state, and the query that says whether a room still has any."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import homeserver, wrap_instance_method

logger = logging.getLogger(__name__)


def _has_partial_state_events_txn(txn: Any, room_id: str) -> bool:
    txn.execute(
        "SELECT 1 FROM partial_state_events WHERE room_id = ? LIMIT 1", (room_id,)
    )
    return txn.fetchone() is not None


async def has_partial_state_events(store: Any, room_id: str) -> bool:
    """Whether any event of ``room_id`` still has partial state."""
    return bool(
        await store.db_pool.runInteraction(
            "sps_has_partial_state_events", _has_partial_state_events_txn, room_id
        )
    )


def current_state_guard(
    native: Callable[..., Awaitable[None]],
    has_partial_state_events: Callable[[str], Awaitable[bool]],
) -> Callable[..., Awaitable[None]]:
    """``native`` (the persistence controller's ``_update_current_state``), run
    only for rooms without partial-state events."""

    async def _update_current_state(room_id: str, task: Any) -> None:
        if await has_partial_state_events(room_id):
            logger.info(
                "Current state of %s not recalculated: events with partial state "
                "arrived meanwhile (the resync brings them to full state first)",
                room_id,
            )
            return
        await native(room_id, task)

    return _update_current_state


def install_current_state_guard(api: ModuleApi) -> None:
    """Never recalculate a room's current state from partial state.

    Synapse recalculates a partial-state room's current state once every event
    has full state, just before clearing the flag. An event that arrived a moment
    earlier (its context computed while its prev events were still partial) can
    be persisted with partial state in between, and be a forward extremity: the
    recalculation then replaces the room's full current state by that event's
    partial state (seen: 30,000 members -> 1 joined, 84 s spent deleting the
    members and unsubscribing from each member's device list), the clear fails
    because of the new partial-state event, and the next round puts the whole
    state back (21 s more). Clients see the member list collapse meanwhile.

    The recalculation runs in the room's event persistence queue, after every
    event queued before it, so checking ``partial_state_events`` there is
    exact: while any is left the current state is kept, and the resync goes
    round again. Stock's resync hits the same race; only the resync calls this
    (``update_current_state`` has no other caller in 1.163, besides the
    replication endpoint workers use for the same purpose).

    Wraps ``EventsPersistenceStorageController._update_current_state`` on this
    homeserver's instance (processes that persist events; signature unchanged
    in 1.163)."""
    controller = homeserver(api).get_storage_controllers().persistence
    if controller is None:
        return  # this process does not persist events
    store = homeserver(api).get_datastores().main

    async def room_has_partial_state_events(room_id: str) -> bool:
        return await has_partial_state_events(store, room_id)

    wrap_instance_method(
        controller,
        "_update_current_state",
        lambda native: current_state_guard(native, room_has_partial_state_events),
        "synapse.storage.controllers.persist_events."
        "EventsPersistenceStorageController._update_current_state",
        "a room's current state is not recalculated while it has partial-state "
        "events (it would become their partial state)",
    )
