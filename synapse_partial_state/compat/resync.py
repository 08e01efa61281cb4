"""The resync seam: Synapse's partial-state resync routed to the module's engine,
and the native operations a resync is made of (:class:`ResyncOps`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.bulk.deltas import finish_hold
from synapse_partial_state.compat.keyfetch import KeyFetchOutcome, fetch_keys_ahead
from synapse_partial_state.compat.patching import (
    PatchRecord,
    homeserver,
    record_patch,
    wrap_instance_method,
)
from synapse_partial_state.compat.persistence import has_partial_state_events
from synapse_partial_state.compat.runtime import call_later_s

if TYPE_CHECKING:
    from synapse.events import EventBase

logger = logging.getLogger(__name__)

#: (initial destination, other destinations, room id) -> None; runs one resync.
ResyncEntry = Callable[[str | None, "Collection[str]", str], Awaitable[None]]


def install_resync_hook(entry: ResyncEntry) -> None:
    """Route Synapse's resyncs to our engine.

    Replaces ``FederationHandler._sync_partial_state_room`` (143 lines; 2 changes
    since 1.100; identical in 1.163.2). Native keeps doing what surrounds it:
    ``do_invite_join`` and the start-up resume both call
    ``_start_partial_state_room_sync``, whose in-memory de-duplication and
    "restart if still partial" logic then calls this method, now ours. The native
    loop gives up for good when every server fails (#13000); ours never does.
    """
    from synapse.handlers.federation import FederationHandler

    if getattr(FederationHandler._sync_partial_state_room, "_sps_wrapped", False):
        return

    async def _sync_partial_state_room(
        self: Any,
        initial_destination: str | None,
        other_destinations: Collection[str],
        room_id: str,
    ) -> None:
        await entry(initial_destination, other_destinations, room_id)

    _sync_partial_state_room._sps_wrapped = True  # type: ignore[attr-defined]
    FederationHandler._sync_partial_state_room = _sync_partial_state_room  # type: ignore[method-assign]
    record_patch(
        PatchRecord(
            "synapse.handlers.federation.FederationHandler._sync_partial_state_room",
            "replace",
            "durable, never-stuck resync engine (retries, failover, abort on leave)",
        )
    )


#: (room ID, local user ID, new membership) -> None; must not block.
LocalMembershipObserver = Callable[[str, str, str], None]


def install_local_membership_observer(
    api: ModuleApi, observer: LocalMembershipObserver
) -> None:
    """Tell ``observer`` whenever a local user's membership event is persisted.

    Wraps ``Notifier.notify_new_room_events`` on this homeserver's instance
    (unchanged in 1.163.2): every process calls it for every event persisted
    (the persister directly, the others through replication), with each
    event's room, type, state key and membership already at hand, so this
    costs a comparison per event. (The module API's ``on_new_event`` callback
    would load each event and its room's whole current state.) The observer
    runs after native; its errors are logged and swallowed."""
    from synapse.api.constants import EventTypes

    is_mine = api.is_mine

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def notify_new_room_events(
            event_entries: list[tuple[Any, str]], max_room_stream_token: Any
        ) -> None:
            await native(event_entries, max_room_stream_token)
            for entry, _event_id in event_entries:
                user_id = entry.state_key
                if entry.type != EventTypes.Member or not user_id:
                    continue
                try:
                    if is_mine(user_id):
                        observer(entry.room_id, user_id, entry.membership or "")
                except Exception:
                    logger.exception("Local membership observer failed")

        return notify_new_room_events

    wrap_instance_method(
        homeserver(api).get_notifier(),
        "notify_new_room_events",
        wrap,
        "synapse.notifier.Notifier.notify_new_room_events",
        "see local users' leaves, kicks and bans at once (a resync in flight for "
        "a room its last local user left stops)",
    )


class ResyncOps:
    """The native Synapse operations a resync is made of, typed, in one place.

    Each method says which Synapse code it calls. Nothing here retries or decides:
    that is the engine's job.
    """

    def __init__(self, api: ModuleApi) -> None:
        hs = homeserver(api)
        self._hs = hs
        # Any: mypy without Synapse's own plugin mis-types @cached methods.
        self._store: Any = hs.get_datastores().main
        self._clock = hs.get_clock()
        self.server_name: str = hs.hostname

    # -- read ---------------------------------------------------------------

    async def is_partial_state_room(self, room_id: str) -> bool:
        return await self._store.is_partial_state_room(room_id)

    async def resync_info(self, room_id: str) -> tuple[str | None, frozenset[str]]:
        """(joined_via, servers_in_room) from ``partial_state_rooms(_servers)``,
        for this room only (Synapse's ``get_partial_state_room_resync_info`` reads
        every partial room)."""

        def txn(t: Any) -> tuple[str | None, frozenset[str]]:
            t.execute(
                "SELECT joined_via FROM partial_state_rooms WHERE room_id = ?",
                (room_id,),
            )
            row = t.fetchone()
            if row is None:
                return None, frozenset()
            t.execute(
                "SELECT server_name FROM partial_state_rooms_servers WHERE room_id = ?",
                (room_id,),
            )
            return row[0], frozenset(r[0] for r in t.fetchall())

        return await self._store.db_pool.runInteraction("sps_resync_info", txn)

    async def join_event_id(self, room_id: str) -> str | None:
        return await partial_join_event_id(self._store, room_id)

    async def local_users_in_room(self, room_id: str) -> Collection[str]:
        return await self._store.get_local_users_in_room(room_id)

    async def count_partial_state_events(self, room_id: str) -> int:
        def txn(t: Any) -> int:
            t.execute(
                "SELECT COUNT(*) FROM partial_state_events WHERE room_id = ?",
                (room_id,),
            )
            return int(t.fetchone()[0])

        return await self._store.db_pool.runInteraction("sps_count_partial", txn)

    async def recent_sender_servers(self, room_id: str, limit: int = 500) -> list[str]:
        """Servers of the senders of the room's latest events (servers learned
        since the join), most recent first."""

        def txn(t: Any) -> list[str]:
            t.execute(
                "SELECT sender FROM events WHERE room_id = ?"
                " ORDER BY stream_ordering DESC LIMIT ?",
                (room_id, limit),
            )
            return [row[0] for row in t.fetchall()]

        senders = await self._store.db_pool.runInteraction("sps_recent_senders", txn)
        seen: dict[str, None] = {}
        for sender in senders:
            server = sender.split(":", 1)[1] if ":" in sender else None
            if server:
                seen.setdefault(server, None)
        return list(seen)

    async def partial_state_events_batch(self, room_id: str) -> list[EventBase]:
        """Up to 100 partial-state events without partial-state prev events,
        in stream order (``get_partial_state_events_batch``)."""
        from synapse.storage.databases.main.events_worker import EventRedactBehaviour

        store = self._store
        batch = await store.get_partial_state_events_batch(room_id)
        if not batch:
            return []
        events = await store.get_events_as_list(
            batch, redact_behaviour=EventRedactBehaviour.as_is, allow_rejected=True
        )
        stale = [e.event_id for e in events if e.internal_metadata.is_outlier()]
        if not stale:
            return events
        # A partial-state event is never an outlier in the database (it has a
        # state group): Synapse's event cache kept the copy it held while the
        # event was an outlier (seen in the benchmark: an event stored as an
        # outlier, as the missing prev event of another, then pulled into the
        # timeline by backfill). Synapse's de-partial-stating asserts on it, so
        # the room would fail the same way at every retry while that copy
        # lives: read those events again from the database.
        logger.warning(
            "Resync of %s: Synapse's event cache held %d partial-state event(s) "
            "as outliers (%s); reading them again from the database",
            room_id,
            len(stale),
            ", ".join(stale[:5]),
        )
        for event_id in stale:
            store._invalidate_local_get_event_cache(event_id)
            await store._invalidate_async_get_event_cache(event_id)
        return await store.get_events_as_list(
            batch, redact_behaviour=EventRedactBehaviour.as_is, allow_rejected=True
        )

    # -- write ----------------------------------------------------------------

    async def update_state_for_partial_state_event(
        self, destination: str, event: EventBase
    ) -> None:
        """Native per-event de-partial-stating: computes the full state before
        ``event`` (fetching from ``destination`` when its prev events are not
        local), re-checks its auth against it, repoints its state group and flips
        its rejection if needed. Raises ``FederationError`` /
        ``FederationPullAttemptBackoffError`` like native."""
        handler = self._hs.get_federation_event_handler()
        await handler.update_state_for_partial_state_event(destination, event)

    async def clear_pull_backoff(
        self, room_id: str, event_ids: Collection[str]
    ) -> None:
        """Forget Synapse's failed attempts to pull ``event_ids``
        (``event_failed_pull_attempts``, the rows Synapse itself deletes once an
        event is persisted), so its next computation of a context pulls them
        again instead of raising ``FederationPullAttemptBackoffError`` for hours."""
        if not event_ids:
            return
        await self._store.db_pool.simple_delete_many(
            table="event_failed_pull_attempts",
            column="event_id",
            iterable=list(event_ids),
            keyvalues={"room_id": room_id},
            desc="sps_clear_pull_backoff",
        )

    async def complete(self, room_id: str) -> bool:
        """The native end of a resync: recompute current state, replay device
        lists, clear the partial flag under Synapse's linearizer, wake waiters and
        replication. False if new partial-state events raced in (go round again).

        On SQLite the user directory's bulk write of the room's members waits
        until the flag is cleared (:class:`FinishHold`: it held the one
        connection the clear's retries needed)."""
        hold = finish_hold(self._store)
        if hold is not None:
            hold.hold(room_id)
        await self._hs.get_state_handler().update_current_state(room_id)
        if await has_partial_state_events(self._store, room_id):
            # Raced by new partial-state events (the current state was kept:
            # ``install_current_state_guard``); the clear would fail too.
            return False
        await self._hs.get_device_handler().handle_room_un_partial_stated(room_id)
        cleared = await self._clear_and_notify(room_id)
        if cleared and hold is not None:
            hold.release(room_id)
        return cleared

    async def _clear_and_notify(self, room_id: str) -> bool:
        fed = self._hs.get_federation_handler()
        async with fed._is_partial_state_room_linearizer.queue(room_id):
            stream_id = await self._store.clear_partial_state_room(room_id)
        if stream_id is None:
            return False
        self._hs.get_storage_controllers().state.notify_room_un_partial_stated(room_id)
        await self._hs.get_notifier().on_un_partial_stated_room(room_id, stream_id)
        return True

    async def local_memberships(self, room_id: str) -> list[tuple[str, str, str]]:
        """(user ID, membership, sender of that membership event) of every
        local user with a membership of the room (``local_current_membership``)."""

        def txn(t: Any) -> list[tuple[str, str, str]]:
            t.execute(
                "SELECT l.user_id, l.membership, e.sender"
                " FROM local_current_membership AS l"
                " INNER JOIN events AS e USING (event_id)"
                " WHERE l.room_id = ?",
                (room_id,),
            )
            return [(row[0], row[1], row[2]) for row in t.fetchall()]

        return await self._store.db_pool.runInteraction("sps_local_memberships", txn)

    async def federation_sender_is_past(self, room_id: str) -> bool:
        """Whether Synapse's federation sender has handed every local membership
        event of the room to its destinations (``federation_stream_position``
        for events, of any sender instance, at or past their stream orderings).
        Until then, purging the room makes it fail (its ``destination_rooms``
        rows refer to the room) and the event is never sent."""

        def txn(t: Any) -> bool:
            t.execute(
                "SELECT MAX(e.stream_ordering) FROM local_current_membership AS l"
                " INNER JOIN events AS e USING (event_id) WHERE l.room_id = ?",
                (room_id,),
            )
            row = t.fetchone()
            last = row[0] if row else None
            t.execute(
                "SELECT MAX(stream_id) FROM federation_stream_position"
                " WHERE type = 'events'"
            )
            row = t.fetchone()
            sent = row[0] if row else None
            return last is None or (sent is not None and sent >= last)

        return await self._store.db_pool.runInteraction(
            "sps_federation_sender_is_past", txn
        )

    async def abort(self, room_id: str) -> bool:
        """Give up a partial-state room that no local user is in any more.

        Its local copy was never complete, and keeping it would be harmful: a later
        rejoin would build on its partial state as if it were whole. So the room is
        purged through Synapse's own ``PaginationHandler.purge_room`` (which refuses
        while a local user is joined, and deletes the partial-state tables in
        foreign-key order), then every waiter on the room or its events is woken.
        False if a local user is joined again (the resync must go on).
        """
        from synapse.api.errors import SynapseError

        hold = finish_hold(self._store)
        if hold is not None:
            hold.release(room_id)

        def txn(t: Any) -> list[str]:
            t.execute(
                "SELECT event_id FROM partial_state_events WHERE room_id = ?",
                (room_id,),
            )
            return [row[0] for row in t.fetchall()]

        event_ids = await self._store.db_pool.runInteraction("sps_partial_events", txn)
        try:
            await self._hs.get_pagination_handler().purge_room(room_id, force=False)
        except SynapseError as e:
            logger.info("Not purging %s: %s", room_id, e)
            return False
        state_storage = self._hs.get_storage_controllers().state
        for event_id in event_ids:
            self._store.is_partial_state_event.invalidate((event_id,))
            state_storage.notify_event_un_partial_stated(event_id)
        self._store.is_partial_state_room.invalidate((room_id,))
        state_storage.notify_room_un_partial_stated(room_id)
        return True

    async def room_exists(self, room_id: str) -> bool:
        return await self._store.get_room(room_id) is not None

    async def prefetch_server_keys(
        self, servers: Collection[str], concurrency: int
    ) -> KeyFetchOutcome:
        """Fetch the signing keys of ``servers`` into Synapse's key store, so that
        checking the signatures of the room's state later finds them locally
        instead of fetching them in waves: from the trusted key servers (notaries)
        Synapse is configured with, many servers per request, then from the
        servers the notaries did not vouch for themselves, at most
        ``concurrency`` at once (:func:`~synapse_partial_state.compat.keyfetch.fetch_keys_ahead`,
        through the keyring's ``PerspectivesKeyFetcher`` and ``ServerKeyFetcher``,
        which check and store what they get); failures are left for the normal
        path."""
        from synapse.crypto.keyring import PerspectivesKeyFetcher, ServerKeyFetcher

        fetchers = self._hs.get_keyring()._key_fetchers
        notaries = next(
            (f for f in fetchers if isinstance(f, PerspectivesKeyFetcher)), None
        )
        direct = next((f for f in fetchers if isinstance(f, ServerKeyFetcher)), None)
        return await fetch_keys_ahead(
            servers, notaries, direct, self.now_ms(), concurrency
        )

    def start_resync(self, room_id: str) -> None:
        """Start a resync the way Synapse does after a join (its de-duplication
        included), with the servers Synapse recorded for the room."""
        fed = self._hs.get_federation_handler()

        async def start() -> None:
            joined_via, servers = await self.resync_info(room_id)
            fed._start_partial_state_room_sync(
                initial_destination=joined_via,
                other_destinations=set(servers),
                room_id=room_id,
            )

        self._hs.run_as_background_process("sps_start_resync", start)

    def now_ms(self) -> int:
        return self._clock.time_msec()

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Any:
        """Synapse's clock ``call_later``, in seconds."""
        return call_later_s(self._clock, delay_s, callback)


async def partial_join_event_id(store: Any, room_id: str) -> str | None:
    """The join event a partial-state room was joined with (None: not partial)."""

    def txn(t: Any) -> str | None:
        t.execute(
            "SELECT join_event_id FROM partial_state_rooms WHERE room_id = ?",
            (room_id,),
        )
        row = t.fetchone()
        return row[0] if row else None

    return await store.db_pool.runInteraction("sps_join_event_id", txn)
