"""The state at a missing prev event, read back in one transaction.

When Synapse takes in an event whose prev event it does not have (an event
pulled to fill a gap, an event received during a resync, and the de-partial-
stating of every partial-state event whose prev events are the resident's:
the join first of all), it asks a server for the state there (``/state_ids``)
and then, in ``FederationEventHandler._get_state_ids_after_missing_prev_event``
(1.163.2), finds which of those events it has (``have_seen_events``, 500 IDs
per transaction), stores the missing ones, and reads every state event's type
and state key (``get_metadata_for_events``, 1,000 per transaction). In a room
of 100,000 members that is some 300 transactions, each with its own trip
through the database thread pool: measured in the benchmark's resync (the
engine had stored every one of those events already), 10 to 13 s per missing
prev event, while the resync waited for it and Synapse's finish waited
behind it.

:func:`install_fast_prev_state` runs the same function with one transaction
for both look-ups (the events' room, type, state key and rejection, as
``get_metadata_for_events`` reads them; "seen" meaning stored in ``events``,
as ``have_seen_events``), and Synapse's own steps for everything else: the
``/state_ids`` request (so the engine's answer is reused as before), the same
10% rule between fetching the whole state and fetching the missing events
(``_get_state_and_persist`` / ``_get_events_and_persist``), the same state map
(events of another room and non-state events left out with Synapse's
warnings; the prev event itself added when it is an unrejected state event),
the same errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import attr
from synapse.storage.database import make_in_list_sql_clause

from synapse_partial_state.compat.patching import wrap_instance_method

logger = logging.getLogger(__name__)

#: Event IDs per statement (PostgreSQL takes them as one array; SQLite's IN
#: list is cut by ``make_in_list_sql_clause``'s engine rules, so keep it under
#: its parameter limit there).
IDS_PER_STATEMENT_POSTGRES = 20_000
IDS_PER_STATEMENT_SQLITE = 500


@attr.s(slots=True, frozen=True, auto_attribs=True)
class StoredEvent:
    """What ``get_metadata_for_events`` reads of a stored event."""

    room_id: str
    event_type: str
    state_key: str | None
    rejection_reason: str | None


def _stored_events_txn(txn: Any, event_ids: list[str]) -> dict[str, StoredEvent]:
    from synapse.storage.engines import PostgresEngine

    engine = txn.database_engine
    step = (
        IDS_PER_STATEMENT_POSTGRES
        if isinstance(engine, PostgresEngine)
        else IDS_PER_STATEMENT_SQLITE
    )
    found: dict[str, StoredEvent] = {}
    # One string per distinct room and type: each row's driver makes its own,
    # and a 100,000-member state is 100,000 copies of each (~14 MiB).
    shared: dict[str, str] = {}
    for start in range(0, len(event_ids), step):
        clause, args = make_in_list_sql_clause(
            engine, "e.event_id", event_ids[start : start + step]
        )
        txn.execute(
            f"""
            SELECT e.event_id, e.room_id, e.type, se.state_key, r.reason
            FROM events AS e
            LEFT JOIN state_events se USING (event_id)
            LEFT JOIN rejections r USING (event_id)
            WHERE {clause}
            """,
            args,
        )
        for event_id, room_id, event_type, state_key, reason in txn:
            found[event_id] = StoredEvent(
                shared.setdefault(room_id, room_id),
                shared.setdefault(event_type, event_type),
                state_key,
                reason,
            )
    return found


async def stored_events(store: Any, event_ids: Iterable[str]) -> dict[str, StoredEvent]:
    """Event ID -> its room, type, state key and rejection, for those of
    ``event_ids`` stored (in any room), in one transaction."""
    ids = sorted(set(event_ids))
    if not ids:
        return {}
    return await store.db_pool.runInteraction(
        "sps_stored_events", _stored_events_txn, ids
    )


def state_map_from(
    room_id: str,
    state_event_ids: Iterable[str],
    stored: Mapping[str, StoredEvent],
    destination: str,
) -> dict[tuple[str, str], str]:
    """The state map Synapse builds from the ``/state_ids`` answer: each stored
    state event of the room under its (type, state key); another room's events
    and non-state events left out with Synapse's warnings."""
    state_map: dict[tuple[str, str], str] = {}
    for event_id in state_event_ids:
        meta = stored.get(event_id)
        if meta is None:
            continue  # reported with the others that failed to fetch
        if meta.room_id != room_id:
            logger.warning(
                "Remote server %s claims event %s in room %s is an auth/state "
                "event in room %s",
                destination,
                event_id,
                meta.room_id,
                room_id,
            )
            continue
        if meta.state_key is None:
            logger.warning(
                "Remote server gave us non-state event in state: %s", event_id
            )
            continue
        state_map[(meta.event_type, meta.state_key)] = event_id
    return state_map


def fetch_whole_state(missing: int, state_ids: int, auth_ids: int) -> bool:
    """Synapse's rule: with 10% or more of the events missing, fetch the whole
    state rather than the missing events one by one."""
    return missing * 10 >= state_ids + auth_ids


def install_fast_prev_state() -> None:
    """``_get_state_ids_after_missing_prev_event`` with its look-ups in one
    transaction (see the module docstring).

    Wraps ``FederationEventHandler._get_state_ids_after_missing_prev_event`` on
    the class (1.163.2; the wrapper never calls the native method: it replays
    its steps), so a process that never builds the handler is not made to."""
    from synapse.handlers.federation_event import FederationEventHandler

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def _get_state_ids_after_missing_prev_event(
            self: Any, destination: str, room_id: str, event_id: str
        ) -> dict[tuple[str, str], str]:
            return await state_after_missing_prev(
                self, self._store, destination, room_id, event_id
            )

        return _get_state_ids_after_missing_prev_event

    wrap_instance_method(
        FederationEventHandler,
        "_get_state_ids_after_missing_prev_event",
        wrap,
        "synapse.handlers.federation_event.FederationEventHandler."
        "_get_state_ids_after_missing_prev_event",
        "read which state events are stored, and their types and state keys, in "
        "one transaction instead of one per 500-1,000 events",
        kind="wrap",
    )


async def state_after_missing_prev(
    handler: Any, store: Any, destination: str, room_id: str, event_id: str
) -> dict[tuple[str, str], str]:
    """Synapse's ``_get_state_ids_after_missing_prev_event`` (1.163.2), step for
    step, with :func:`stored_events` for its two look-ups."""
    from synapse.storage.databases.main.events_worker import EventRedactBehaviour

    started = time.monotonic()
    (
        state_event_ids,
        auth_event_ids,
    ) = await handler._federation_client.get_room_state_ids(
        destination, room_id, event_id=event_id
    )
    fetched = time.monotonic()
    desired_events = set(state_event_ids)
    desired_events.add(event_id)
    stored = await stored_events(store, desired_events.union(auth_event_ids))
    missing_event_ids = (desired_events - stored.keys()) | (
        set(auth_event_ids) - stored.keys()
    )
    persisted = True
    if fetch_whole_state(
        len(missing_event_ids), len(state_event_ids), len(auth_event_ids)
    ):
        await handler._get_state_and_persist(destination, room_id, event_id)
    elif missing_event_ids:
        await handler._get_events_and_persist(
            destination=destination, room_id=room_id, event_ids=missing_event_ids
        )
    else:
        persisted = False  # everything was stored: the look-up stands
    if persisted:
        # What was stored stays stored: read the rest again.
        again = await stored_events(store, desired_events - stored.keys())
        stored = {**stored, **again}

    state_map = state_map_from(room_id, state_event_ids, stored, destination)

    remote_event = await store.get_event(
        event_id,
        allow_none=True,
        allow_rejected=True,
        redact_behaviour=EventRedactBehaviour.as_is,
    )
    if not remote_event:
        raise Exception(f"Unable to get missing prev_event {event_id}")

    failed_to_fetch = _not_stored(desired_events, stored)
    failed_to_fetch.discard(event_id)
    if failed_to_fetch:
        logger.warning(
            "Failed to fetch missing state events for %s %s",
            event_id,
            failed_to_fetch,
        )

    if remote_event.is_state() and remote_event.rejected_reason is None:
        state_map[(remote_event.type, remote_event.state_key)] = remote_event.event_id

    logger.info(
        "State after missing prev event %s of %s: %d state events (%d were "
        "missing) read in %.2f s after the /state_ids answer (%.2f s)",
        event_id,
        room_id,
        len(state_map),
        len(missing_event_ids),
        time.monotonic() - fetched,
        fetched - started,
    )
    return state_map


def _not_stored(
    desired: Collection[str], stored: Mapping[str, StoredEvent]
) -> set[str]:
    """Of ``desired``, those not stored (Synapse: not in ``get_metadata_for_events``'
    answer)."""
    return {event_id for event_id in desired if event_id not in stored}
