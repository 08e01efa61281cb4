"""The ``/make_join`` seam: the signing-servers hint, both sides.

Resident side: ``FederationServer.on_make_join_request`` is wrapped to add
:data:`~synapse_partial_state.wire.SIGNING_SERVERS_FIELD` to the answers Synapse
gives (a refused ``/make_join`` raises Synapse's error before anything of ours
runs).

Joining side: the federation transport client's ``make_membership_event`` is
wrapped to hand a join's hint to the module (which fetches those servers' signing
keys in the background, while the resident validates the join and builds its
partial ``/send_join`` answer), and ``FederationClient._do_send_join`` to let the
module finish that fetch and check the answer in bulk before Synapse checks its
signatures (so that it finds the keys stored instead of fetching them itself, one
wave later), and ``FederationClient._check_sigs_and_hash_and_fetch_one`` to skip
Synapse's per-event check of the events the module vouched for.

Checked against Synapse 1.163.2.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import (
    homeserver,
    main_store,
    wrap_instance_method,
)
from synapse_partial_state.compat.runtime import call_later_s
from synapse_partial_state.wire import SIGNING_SERVERS_FIELD, parse_signing_servers

if TYPE_CHECKING:
    from synapse.api.room_versions import RoomVersion
    from synapse.events import EventBase
    from synapse.federation.federation_server import FederationServer

logger = logging.getLogger(__name__)

#: (room ID, joining user ID) -> the servers to name in the hint.
SigningServersProvider = Callable[[str, str], Awaitable[list[str]]]
#: (room ID, servers named by the resident's hint) on the joining side; must not
#: block.
HintObserver = Callable[[str, list[str]], None]
#: (room ID, room version, the state and the auth chain of a /send_join answer,
#: the join event(s), whether members were omitted) -> the outcome: the events
#: whose signatures and hashes the callee checked (Synapse then skips its own
#: per-event check for them), and the IDs of events to take out of the answer
#: (its state and auth chain; only from a partial answer); called once the
#: answer has arrived, before Synapse's checks, which
#: it may delay (bounded by the callee).
SendJoinChecker = Callable[
    [str, "RoomVersion", list["EventBase"], list["EventBase"], list["EventBase"], bool],
    Awaitable["JoinCheckOutcome"],
]


class JoinCheckOutcome(Protocol):
    """What :data:`SendJoinChecker` returns (``joining.join_check``)."""

    @property
    def vouched(self) -> Collection[EventBase]: ...

    @property
    def left_out(self) -> Collection[str]: ...


#: How long events checked ahead are remembered for Synapse's check (which
#: follows at once: this only bounds what a failed-over answer leaves behind).
_VOUCHED_KEEP_S = 120


def install_signing_servers_hint(provider: SigningServersProvider) -> None:
    """Add ``provider``'s servers to the ``/make_join`` answers Synapse gives.

    ``FederationServer.on_make_join_request`` (24 lines in 1.163.2: ACL, room
    version, per-room rate limit, then the handler's auth checks; the servlet
    looks it up on the instance at call time) is wrapped: once the native method
    has returned an answer, the field is added; a failure of ``provider`` is
    logged and leaves the answer as stock's.
    """
    from synapse.federation import federation_server as fs

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def on_make_join_request(
            self: FederationServer,
            origin: str,
            room_id: str,
            user_id: str,
            supported_versions: list[str],
        ) -> dict[str, Any]:
            resp = await native(self, origin, room_id, user_id, supported_versions)
            try:
                servers = await provider(room_id, user_id)
            except Exception:
                logger.exception(
                    "Could not list the signing servers of %s for a make_join", room_id
                )
                return resp
            if servers:
                resp[SIGNING_SERVERS_FIELD] = servers
            return resp

        return on_make_join_request

    wrap_instance_method(
        fs.FederationServer,
        "on_make_join_request",
        wrap,
        "synapse.federation.federation_server.FederationServer.on_make_join_request",
        "name in make_join answers the servers whose signing keys the partial "
        "send_join answer will need (org.matrix.msc2775.signing_servers)",
        kind="wrap",
    )


def install_join_key_prefetch(
    api: ModuleApi, on_hint: HintObserver, before_check: SendJoinChecker
) -> None:
    """On the joining side (the main process, where Synapse joins rooms): tell
    ``on_hint`` the servers a resident's ``/make_join`` answer names, and await
    ``before_check(room_id, room_version, state, auth_chain, joins, partial)``
    between receiving a ``/send_join`` answer and Synapse's checks of its
    signatures; Synapse's per-event check is skipped for the events it vouched
    for, and the events it leaves out are taken out of a partial answer.

    * ``TransportLayerClient.make_membership_event`` (the one federation
      transport client's method; ``FederationClient.make_membership_event``
      calls it through its ``transport_layer`` attribute) is wrapped on that
      instance: its answer is returned unchanged.
    * ``FederationClient._do_send_join`` (34 lines in 1.163.2: the v2 request,
      v1 fallback), called by ``send_join`` on the instance before it checks the
      answer's signatures and hashes, is wrapped on that instance.
    * ``FederationClient._check_sigs_and_hash_and_fetch_one`` (the per-event
      check ``send_join`` runs on every event of the answer: signatures, with
      keys fetched as needed, hash, policy server, spam checker) is wrapped on
      that instance: for an event ``before_check`` vouched for (the very
      object, once) it returns the event, as native does for an event that
      passes; every other event goes to native.
    """
    hs = homeserver(api)
    client = hs.get_federation_client()
    transport = client.transport_layer
    clock = hs.get_clock()

    def wrap_make(native: Callable[..., Any]) -> Callable[..., Any]:
        async def make_membership_event(
            destination: str,
            room_id: str,
            user_id: str,
            membership: str,
            params: Any,
        ) -> Any:
            resp = await native(destination, room_id, user_id, membership, params)
            if membership == "join":
                servers = parse_signing_servers(resp)
                if servers:
                    try:
                        on_hint(room_id, servers)
                    except Exception:
                        logger.exception("Signing-key prefetch for %s failed", room_id)
            return resp

        return make_membership_event

    def wrap_send_join(native: Callable[..., Any]) -> Callable[..., Any]:
        async def _do_send_join(
            room_version: RoomVersion,
            destination: str,
            pdu: EventBase,
            omit_members: bool,
        ) -> Any:
            response = await native(room_version, destination, pdu, omit_members)
            if response.state_dag:  # MSC4242: not a partial answer
                return response
            joins = [pdu] if response.event is None else [pdu, response.event]
            outcome = await before_check(
                pdu.room_id,
                room_version,
                response.state,
                response.auth_events,
                joins,
                bool(response.members_omitted),
            )
            if outcome.left_out and response.members_omitted:
                # Partial state: members the join does not need, whose signing
                # keys did not come in time (and what only they need), go with
                # the resync.
                left_out = outcome.left_out
                response.state = [
                    e for e in response.state if e.event_id not in left_out
                ]
                response.auth_events = [
                    e for e in response.auth_events if e.event_id not in left_out
                ]
            vouched = outcome.vouched
            if vouched:
                ids = [id(event) for event in vouched]
                _VOUCHED.update(zip(ids, vouched, strict=True))

                def forget() -> None:
                    for key in ids:
                        _VOUCHED.pop(key, None)

                call_later_s(clock, _VOUCHED_KEEP_S, forget)
            return response

        return _do_send_join

    def wrap_check_one(native: Callable[..., Any]) -> Callable[..., Any]:
        async def _check_sigs_and_hash_and_fetch_one(*args: Any, **kwargs: Any) -> Any:
            pdu = kwargs["pdu"] if "pdu" in kwargs else args[0]
            if _VOUCHED.get(id(pdu)) is pdu:
                del _VOUCHED[id(pdu)]
                return pdu
            return await native(*args, **kwargs)

        return _check_sigs_and_hash_and_fetch_one

    wrap_instance_method(
        transport,
        "make_membership_event",
        wrap_make,
        "synapse.federation.transport.client.TransportLayerClient.make_membership_event",
        "fetch the signing keys a make_join answer names, in the background",
    )
    wrap_instance_method(
        client,
        "_do_send_join",
        wrap_send_join,
        "synapse.federation.federation_client.FederationClient._do_send_join",
        "let the signing-key prefetch of the join finish, and check the "
        "answer's signatures and hashes in bulk, before Synapse's checks",
    )
    wrap_instance_method(
        client,
        "_check_sigs_and_hash_and_fetch_one",
        wrap_check_one,
        "synapse.federation.federation_client.FederationClient"
        "._check_sigs_and_hash_and_fetch_one",
        "skip the per-event check of the /send_join answer's events checked in bulk",
    )


#: id(event) -> event: events of a /send_join answer checked in bulk, until
#: Synapse's per-event check of that very object (which then returns it).
_VOUCHED: dict[int, EventBase] = {}


def _senders_txn(
    txn: Any, room_id: str, user_ids: Collection[str]
) -> tuple[list[str], dict[str, str]]:
    """Senders of the room's current non-member state (sorted), and of the
    current membership events of ``user_ids`` (their own, and who banned,
    kicked or invited them), by user ID."""
    txn.execute(
        """
        SELECT DISTINCT e.sender FROM current_state_events AS c
        INNER JOIN events AS e USING (event_id)
        WHERE c.room_id = ? AND c.type != 'm.room.member'
        """,
        (room_id,),
    )
    senders = sorted({row[0] for row in txn})
    by_member: dict[str, str] = {}
    users = list(user_ids)
    for start in range(0, len(users), 100):
        batch = users[start : start + 100]
        txn.execute(
            f"""
            SELECT c.state_key, m.sender FROM current_state_events AS c
            INNER JOIN room_memberships AS m USING (event_id)
            WHERE c.room_id = ? AND c.type = 'm.room.member'
              AND c.state_key IN ({", ".join("?" for _ in batch)})
            """,
            (room_id, *batch),
        )
        by_member.update((row[0], row[1]) for row in txn)
    return senders, by_member


async def state_senders(
    api: ModuleApi, room_id: str, user_ids: Collection[str]
) -> tuple[list[str], dict[str, str]]:
    """User IDs that sent the room's current non-member state, and who sent the
    current membership event of each of ``user_ids`` (one transaction)."""
    return await main_store(api).db_pool.runInteraction(
        "sps_make_join_signing_servers", _senders_txn, room_id, user_ids
    )


def _servers_with_keys_txn(txn: Any, servers: list[str], valid_at_ms: int) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(servers), 100):
        batch = servers[start : start + 100]
        txn.execute(
            f"""
            SELECT DISTINCT server_name FROM server_keys_json
            WHERE ts_valid_until_ms > ?
              AND server_name IN ({", ".join("?" for _ in batch)})
            """,
            (valid_at_ms, *batch),
        )
        found.update(row[0] for row in txn)
    return found


async def servers_with_stored_keys(
    api: ModuleApi, servers: Iterable[str], valid_at_ms: int
) -> set[str]:
    """Which of ``servers`` have a signing key in Synapse's key store valid at
    ``valid_at_ms`` (``server_keys_json``, where fetched keys are stored)."""
    wanted = list(dict.fromkeys(servers))
    if not wanted:
        return set()
    return await main_store(api).db_pool.runInteraction(
        "sps_servers_with_stored_keys", _servers_with_keys_txn, wanted, valid_at_ms
    )


async def forward_extremities(api: ModuleApi, room_id: str) -> frozenset[str]:
    """The room's forward extremities (Synapse's cached
    ``get_latest_event_ids_in_room``, invalidated by every new event)."""
    store: Any = main_store(api)
    return frozenset(await store.get_latest_event_ids_in_room(room_id))


#: (room ID, joining user ID) of the ``/make_join`` this task is answering.
_MAKE_JOIN: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "sps_make_join", default=None
)


def install_make_join_reads(api: ModuleApi) -> None:
    """Let Synapse's ``/make_join`` read only the current state it uses.

    ``FederationHandler.on_make_join_request`` (1.163.2) reads the room's whole
    current state (``get_current_state_ids(room_id)``, cached per room until the
    next state change: in a room being joined that is every join) to use three
    things of it: the join rules, the joiner's membership and, in a restricted
    room only, the local members who could invite. At 100,000 members that read
    is 100,000 rows and over a second, for each ``/make_join`` after a join.

    Two wrappers: the handler's ``on_make_join_request`` marks the task
    (:data:`_MAKE_JOIN`), and, on the instance, the state storage controller's
    ``get_current_state_ids`` answers the marked task's unfiltered read of that
    room with the non-member state and the joiner's membership, or, when the
    join rules are restricted, with the whole state as before. Every other read
    passes through.
    """
    from synapse.api.constants import EventTypes
    from synapse.handlers import federation
    from synapse.types.state import StateFilter

    hs = homeserver(api)
    auth = hs.get_event_auth_handler()
    store: Any = hs.get_datastores().main

    def wrap_handler(native: Callable[..., Any]) -> Callable[..., Any]:
        async def on_make_join_request(
            self: Any, origin: str, room_id: str, user_id: str
        ) -> Any:
            token = _MAKE_JOIN.set((room_id, user_id))
            try:
                return await native(self, origin, room_id, user_id)
            finally:
                _MAKE_JOIN.reset(token)

        return on_make_join_request

    def wrap_reads(native: Callable[..., Any]) -> Callable[..., Any]:
        async def get_current_state_ids(
            room_id: str, state_filter: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            marked = _MAKE_JOIN.get()
            if state_filter is not None or marked is None or marked[0] != room_id:
                return await native(room_id, state_filter, *args, **kwargs)
            narrowed = await native(
                room_id,
                StateFilter.freeze(
                    {EventTypes.Member: {marked[1]}}, include_others=True
                ),
                *args,
                **kwargs,
            )
            room_version = await store.get_room_version(room_id)
            if await auth.has_restricted_join_rules(narrowed, room_version):
                return await native(room_id, None, *args, **kwargs)
            return narrowed

        return get_current_state_ids

    wrap_instance_method(
        federation.FederationHandler,
        "on_make_join_request",
        wrap_handler,
        "synapse.handlers.federation.FederationHandler.on_make_join_request",
        "mark the task, so that its read of the room's current state is narrowed",
        kind="wrap",
    )
    wrap_instance_method(
        hs.get_storage_controllers().state,
        "get_current_state_ids",
        wrap_reads,
        "synapse.storage.controllers.state.StateStorageController"
        ".get_current_state_ids",
        "for a /make_join: the non-member state and the joiner's membership "
        "(the whole state in a restricted room), not the whole current state",
    )
