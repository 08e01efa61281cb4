"""The compat layer: every private Synapse access and every patch lives here.

The rest of the package imports only public names (``synapse.module_api``,
``synapse.api.*`` constants) and the typed helpers below. Each patch records what it
replaces and the Synapse versions it was checked against; the list of installed
patches is served by the status endpoint so that tests (and admins) can see it.

Checked against: matrix-synapse 1.163.2 (source read in the installed wheel).
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import attr
import synapse
from synapse.module_api import ModuleApi
from synapse.module_api.errors import ConfigError

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.federation.federation_server import FederationServer
    from synapse.server import HomeServer
    from synapse.storage.databases.main import DataStore
    from synapse.storage.roommember import MemberSummary
    from synapse.types import StateMap

logger = logging.getLogger(__name__)

#: The Synapse releases this module was tested against: (lowest, first excluded).
TESTED_SYNAPSE_RANGE = ((1, 163, 0), (1, 164, 0))


def synapse_version() -> tuple[int, int, int]:
    """The installed Synapse's version as a tuple of three integers."""
    parts = []
    for piece in synapse.__version__.split(".")[:3]:
        # Leading digits only: "0rc1" is 0.
        match = re.match(r"\d*", piece)
        parts.append(int(match.group(0) or 0) if match else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def check_synapse_version(allow_untested: bool) -> None:
    """Refuse to start on a Synapse outside the tested range, unless told to."""
    low, high = TESTED_SYNAPSE_RANGE
    found = synapse_version()
    if low <= found < high:
        return
    tested = f"{'.'.join(map(str, low))} <= version < {'.'.join(map(str, high))}"
    if allow_untested:
        logger.warning(
            "synapse_partial_state: Synapse %s is outside the tested range (%s); "
            "starting anyway because allow_untested_synapse is set",
            synapse.__version__,
            tested,
        )
        return
    raise ConfigError(
        f"partial-state module: Synapse {synapse.__version__} is outside the range "
        f"this module was tested with ({tested}). Its patches reach into Synapse "
        "internals that may have changed. Upgrade the module, or set "
        "'allow_untested_synapse: true' in its config to start anyway."
    )


@attr.s(frozen=True, auto_attribs=True, slots=True)
class PatchRecord:
    """What one patch replaces, for the status endpoint and the start-up log."""

    target: str
    kind: str
    why: str
    checked: str = "1.163.2"


#: Patches installed in this process, in order.
INSTALLED_PATCHES: list[PatchRecord] = []


def _record(record: PatchRecord) -> None:
    if record not in INSTALLED_PATCHES:
        INSTALLED_PATCHES.append(record)


def homeserver(api: ModuleApi) -> HomeServer:
    """The ``HomeServer`` behind the module API (private attribute ``_hs``)."""
    return api._hs


def main_store(api: ModuleApi) -> DataStore:
    """Synapse's main data store (private: reached through the homeserver)."""
    return homeserver(api).get_datastores().main


# ---------------------------------------------------------------------------
# Joining side: the resync engine's hook and the native operations it uses
# ---------------------------------------------------------------------------

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
    _record(
        PatchRecord(
            "synapse.handlers.federation.FederationHandler._sync_partial_state_room",
            "replace",
            "durable, never-stuck resync engine (retries, failover, abort on leave)",
        )
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
        """(joined_via, servers_in_room) from ``partial_state_rooms(_servers)``."""
        info = await self._store.get_partial_state_room_resync_info()
        entry = info.get(room_id)
        if entry is None:
            return None, frozenset()
        return entry.joined_via, frozenset(entry.servers_in_room)

    async def join_event_id(self, room_id: str) -> str | None:
        def txn(t: Any) -> str | None:
            t.execute(
                "SELECT join_event_id FROM partial_state_rooms WHERE room_id = ?",
                (room_id,),
            )
            row = t.fetchone()
            return row[0] if row else None

        return await self._store.db_pool.runInteraction("sps_join_event_id", txn)

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

        batch = await self._store.get_partial_state_events_batch(room_id)
        if not batch:
            return []
        return await self._store.get_events_as_list(
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

    async def complete(self, room_id: str) -> bool:
        """The native end of a resync: recompute current state, replay device
        lists, clear the partial flag under Synapse's linearizer, wake waiters and
        replication. False if new partial-state events raced in (go round again)."""
        await self._hs.get_state_handler().update_current_state(room_id)
        await self._hs.get_device_handler().handle_room_un_partial_stated(room_id)
        return await self._clear_and_notify(room_id)

    async def _clear_and_notify(self, room_id: str) -> bool:
        fed = self._hs.get_federation_handler()
        async with fed._is_partial_state_room_linearizer.queue(room_id):
            stream_id = await self._store.clear_partial_state_room(room_id)
        if stream_id is None:
            return False
        self._hs.get_storage_controllers().state.notify_room_un_partial_stated(room_id)
        await self._hs.get_notifier().on_un_partial_stated_room(room_id, stream_id)
        return True

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
    ) -> tuple[int, int]:
        """Fetch the signing keys of ``servers`` from the servers themselves, at
        most ``concurrency`` at once, into Synapse's key store, so that checking
        the signatures of the room's state later finds them locally instead of
        fetching them in waves. Uses ``ServerKeyFetcher.get_server_verify_keys_v2_direct``
        (which stores what it gets); failures are left for the normal path.
        Returns (servers fetched, servers failed)."""
        from synapse.crypto.keyring import ServerKeyFetcher
        from twisted.internet.defer import DeferredSemaphore

        fetchers = self._hs.get_keyring()._key_fetchers
        fetcher = next((f for f in fetchers if isinstance(f, ServerKeyFetcher)), None)
        if fetcher is None:
            return 0, 0
        semaphore = DeferredSemaphore(concurrency)
        outcome = {"ok": 0, "failed": 0}

        async def one(server: str) -> None:
            from synapse.logging.context import make_deferred_yieldable

            await make_deferred_yieldable(semaphore.acquire())
            try:
                await fetcher.get_server_verify_keys_v2_direct(server)
                outcome["ok"] += 1
            except Exception as e:  # a dead server: verification will say so later
                logger.debug("Key prefetch from %s failed: %s", server, e)
                outcome["failed"] += 1
            finally:
                semaphore.release()

        from synapse.util.async_helpers import yieldable_gather_results

        await yieldable_gather_results(one, servers)
        return outcome["ok"], outcome["failed"]

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
        """Synapse's clock ``call_later`` (takes a ``Duration`` since 1.144)."""
        from synapse.util.duration import Duration

        return self._clock.call_later(Duration(milliseconds=delay_s * 1000), callback)


def is_pull_backoff(error: BaseException) -> int | None:
    """``retry_after_ms`` if ``error`` is Synapse's pull-attempt back-off."""
    from synapse.api.errors import FederationPullAttemptBackoffError

    if isinstance(error, FederationPullAttemptBackoffError):
        return int(error.retry_after_ms)
    return None


def is_federation_failure(error: BaseException) -> bool:
    """Whether ``error`` is how native says "this server could not give us state"."""
    from synapse.api.errors import FederationError

    return isinstance(error, FederationError)


# ---------------------------------------------------------------------------
# Resident side: partial /send_join answers
# ---------------------------------------------------------------------------

#: Extra membership state keys (user IDs), in priority order, chosen for the
#: ``/send_join`` being answered in this task. Set by the ``on_send_join_request``
#: wrapper before native code runs, read by the state selector it calls.
_SEND_JOIN_EXTRAS: contextvars.ContextVar[tuple[str, ...] | None] = (
    contextvars.ContextVar("sps_send_join_extras", default=None)
)

#: (room_id, joining user id) -> member user IDs to add to the partial state.
ExtrasProvider = Callable[[str, str], Awaitable[tuple[str, ...]]]
#: (room_id, joining user id) -> extra top-level fields for the partial answer.
ResponseDecorator = Callable[[str, str], Awaitable[Mapping[str, Any]]]
#: (join event, state before the join, room summary, extra user IDs) -> state IDs.
StateSelector = Callable[
    ["EventBase", "StateMap[str]", "Mapping[str, MemberSummary]", tuple[str, ...]],
    Collection[str],
]


def install_send_join_hooks(
    extras_provider: ExtrasProvider,
    selector: StateSelector,
    decorate_response: ResponseDecorator,
) -> None:
    """Enrich partial ``/send_join`` answers (MSC3706 + MSC2775 essentials).

    Two patches, working together:

    * ``FederationServer.on_send_join_request`` (class method, 123 lines in 1.163.2)
      is wrapped: for partial answers it first asks ``extras_provider`` which member
      events to add (async, from the database) and keeps them in a context variable,
      then calls the native method, then adds ``decorate_response``'s fields.
    * the module-level ``_get_event_ids_for_partial_state_join`` (46 lines,
      unchanged since 1.100), which native looks up by global name at call time, is
      replaced by ``selector``. It sees the exact state before the join, so only
      member events really in that state are ever returned; the native auth-chain
      computation and deduplication then apply to them unchanged.
    """
    from synapse.federation import federation_server as fs

    native_on_send_join = fs.FederationServer.on_send_join_request
    if getattr(native_on_send_join, "_sps_wrapped", False):
        return

    def select(
        join_event: EventBase,
        prev_state_ids: StateMap[str],
        summary: Mapping[str, MemberSummary],
    ) -> Collection[str]:
        extras = _SEND_JOIN_EXTRAS.get()
        return selector(join_event, prev_state_ids, summary, extras or ())

    async def on_send_join_request(
        self: FederationServer,
        origin: str,
        content: dict[str, Any],
        room_id: str,
        caller_supports_partial_state: bool = False,
    ) -> dict[str, Any]:
        if not caller_supports_partial_state:
            return await native_on_send_join(self, origin, content, room_id, False)
        joiner = content.get("state_key")
        if not isinstance(joiner, str):
            # Let native code produce its usual error for a malformed join.
            return await native_on_send_join(self, origin, content, room_id, True)
        token = _SEND_JOIN_EXTRAS.set(await extras_provider(room_id, joiner))
        try:
            resp = await native_on_send_join(self, origin, content, room_id, True)
        finally:
            _SEND_JOIN_EXTRAS.reset(token)
        if resp.get("members_omitted"):
            resp.update(await decorate_response(room_id, joiner))
        return resp

    on_send_join_request._sps_wrapped = True  # type: ignore[attr-defined]
    fs.FederationServer.on_send_join_request = on_send_join_request  # type: ignore[method-assign]
    fs._get_event_ids_for_partial_state_join = select
    _record(
        PatchRecord(
            "synapse.federation.federation_server.FederationServer.on_send_join_request",
            "wrap",
            "choose MSC2775 essentials before, add the summary after the native answer",
        )
    )
    _record(
        PatchRecord(
            "synapse.federation.federation_server._get_event_ids_for_partial_state_join",
            "replace",
            "partial state = native choice + MSC2775 essential members",
        )
    )


async def get_room_summary(api: ModuleApi, room_id: str) -> Mapping[str, MemberSummary]:
    """Synapse's cached member summary of the room's current state."""
    # Any: mypy without Synapse's own plugin mis-types @cached methods.
    store: Any = main_store(api)
    return await store.get_room_summary(room_id)


def heroes_from_summary(summary: Mapping[str, MemberSummary], me: str) -> list[str]:
    """The room's heroes as Synapse computes them for ``/sync`` summaries."""
    from synapse.storage.databases.main.roommember import (
        extract_heroes_from_room_summary,
    )

    return extract_heroes_from_room_summary(summary, me)


async def get_current_state_event_content(
    api: ModuleApi, room_id: str, event_type: str, state_key: str
) -> Mapping[str, Any] | None:
    """Content of a current (non-member) state event, or None."""
    storage = homeserver(api).get_storage_controllers()
    event = await storage.state.get_current_state_event(room_id, event_type, state_key)
    return None if event is None else event.content
