"""The ``/send_join`` seam (resident side): the one wrapper of
``FederationServer.on_send_join_request``, the partial-state selector, and the
room facts the essentials are chosen from (summary, power levels, memberships)."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import attr
from synapse.api.constants import Membership
from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import (
    PatchRecord,
    homeserver,
    main_store,
    record_patch,
    record_patch_replacing,
)
from synapse_partial_state.compat.servlets import (
    after_response,
    replace_federation_servlets,
    request_aware_servlet,
)

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.federation.federation_server import FederationServer
    from synapse.storage.roommember import MemberSummary
    from synapse.types import StateMap

logger = logging.getLogger(__name__)

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
#: (room ID, the ``prev_events`` of a join we answered with partial state).
PartialJoinObserver = Callable[[str, list[str]], None]


@attr.s(auto_attribs=True, slots=True)
class _SendJoinHooks:
    """What the one ``on_send_join_request`` wrapper calls (None: not installed)."""

    extras_provider: ExtrasProvider | None = None
    decorate_response: ResponseDecorator | None = None
    observer: PartialJoinObserver | None = None


_SEND_JOIN_HOOKS = _SendJoinHooks()

_ON_SEND_JOIN_TARGET = (
    "synapse.federation.federation_server.FederationServer.on_send_join_request"
)


def _wrap_on_send_join_request() -> None:
    """Wrap ``FederationServer.on_send_join_request`` once, calling the hooks
    registered in :data:`_SEND_JOIN_HOOKS`, and (re)record what the wrapper does.

    ``on_send_join_request`` is a class method of 123 lines in 1.163.2; the
    servlets look it up on the instance at call time. For a partial answer the
    wrapper:

    1. asks ``extras_provider`` which member events to add (async, from the
       database) and keeps them in a context variable for the state selector;
    2. calls the native method;
    3. when the answer has ``members_omitted``: adds ``decorate_response``'s
       fields, and once the answer has been sent (see
       :func:`install_partial_join_observer`) tells ``observer(room_id,
       join["prev_events"])`` (which must not block; its errors are logged and
       swallowed).

    Full answers go through the native method untouched.
    """
    from synapse.federation import federation_server as fs

    native = fs.FederationServer.on_send_join_request
    if not getattr(native, "_sps_wrapped", False):

        async def on_send_join_request(
            self: FederationServer,
            origin: str,
            content: dict[str, Any],
            room_id: str,
            caller_supports_partial_state: bool = False,
        ) -> dict[str, Any]:
            resp = await _native_with_extras(
                native, self, origin, content, room_id, caller_supports_partial_state
            )
            if resp.get("members_omitted"):
                await _after_partial_answer(resp, content, room_id)
            return resp

        on_send_join_request._sps_wrapped = True  # type: ignore[attr-defined]
        fs.FederationServer.on_send_join_request = on_send_join_request  # type: ignore[method-assign]

    duties = []
    if _SEND_JOIN_HOOKS.extras_provider is not None:
        duties.append(
            "choose MSC2775 essentials before, add the summary after the native answer"
        )
    if _SEND_JOIN_HOOKS.observer is not None:
        duties.append(
            "once a partial answer has been sent, prepare the /state the joiner's "
            "resync asks for next, in the background"
        )
    record_patch_replacing(PatchRecord(_ON_SEND_JOIN_TARGET, "wrap", "; ".join(duties)))


async def _native_with_extras(
    native: Callable[..., Awaitable[dict[str, Any]]],
    server: FederationServer,
    origin: str,
    content: dict[str, Any],
    room_id: str,
    caller_supports_partial_state: bool,
) -> dict[str, Any]:
    """The native answer; for a partial one, with the extras the provider chose
    in :data:`_SEND_JOIN_EXTRAS` while native code runs."""
    joiner = content.get("state_key")
    extras_provider = _SEND_JOIN_HOOKS.extras_provider
    if (
        not caller_supports_partial_state
        or extras_provider is None
        # Malformed join: native code produces its usual error.
        or not isinstance(joiner, str)
    ):
        return await native(
            server, origin, content, room_id, caller_supports_partial_state
        )
    token = _SEND_JOIN_EXTRAS.set(await extras_provider(room_id, joiner))
    try:
        return await native(server, origin, content, room_id, True)
    finally:
        _SEND_JOIN_EXTRAS.reset(token)


async def _after_partial_answer(
    resp: dict[str, Any], content: dict[str, Any], room_id: str
) -> None:
    """Add ``decorate_response``'s fields to a partial answer, and tell the
    observer once it has been sent."""
    hooks = _SEND_JOIN_HOOKS
    joiner = content.get("state_key")
    if hooks.decorate_response is not None and isinstance(joiner, str):
        resp.update(await hooks.decorate_response(room_id, joiner))
    observer = hooks.observer
    if observer is not None:
        prev_events = content.get("prev_events")
        prev = (
            [e for e in prev_events if isinstance(e, str)]
            if isinstance(prev_events, list)
            else []
        )
        after_response(
            lambda: observer(room_id, prev),
            f"partial join observer for {room_id}",
        )


def install_send_join_hooks(
    extras_provider: ExtrasProvider,
    selector: StateSelector,
    decorate_response: ResponseDecorator,
) -> None:
    """Enrich partial ``/send_join`` answers (MSC3706 + MSC2775 essentials).

    Two patches, working together:

    * the ``FederationServer.on_send_join_request`` wrapper (see
      :func:`_wrap_on_send_join_request`, shared with
      :func:`install_partial_join_observer`) asks ``extras_provider`` which member
      events to add before the native method runs, and adds ``decorate_response``'s
      fields to partial answers;
    * the module-level ``_get_event_ids_for_partial_state_join`` (46 lines,
      unchanged since 1.100), which native looks up by global name at call time, is
      replaced by ``selector``. It sees the exact state before the join, so only
      member events really in that state are ever returned; the native auth-chain
      computation and deduplication then apply to them unchanged.

    Installing again replaces the hooks.
    """
    from synapse.federation import federation_server as fs

    def select(
        join_event: EventBase,
        prev_state_ids: StateMap[str],
        summary: Mapping[str, MemberSummary],
    ) -> Collection[str]:
        extras = _SEND_JOIN_EXTRAS.get()
        return selector(join_event, prev_state_ids, summary, extras or ())

    _SEND_JOIN_HOOKS.extras_provider = extras_provider
    _SEND_JOIN_HOOKS.decorate_response = decorate_response
    _wrap_on_send_join_request()
    fs._get_event_ids_for_partial_state_join = select
    record_patch(
        PatchRecord(
            "synapse.federation.federation_server._get_event_ids_for_partial_state_join",
            "replace",
            "partial state = native choice + MSC2775 essential members",
        )
    )


def install_partial_join_observer(observer: PartialJoinObserver) -> None:
    """Tell ``observer`` when a server got a partial ``/send_join`` answer from us.

    Registers ``observer`` with the one ``FederationServer.on_send_join_request``
    wrapper (:func:`_wrap_on_send_join_request`), which calls it with the room ID
    and the join's ``prev_events`` for every answer with ``members_omitted``, once
    the answer has been written (so that what it starts does not compete with
    sending it). Such a joiner resyncs next: it asks for ``/state_ids`` and
    ``/state`` at those events once it has processed the answer. Installing again
    replaces it.

    To know when the answer has been written, ``FederationV2SendJoinServlet`` (the
    only ``/send_join`` with partial answers; unchanged since 1.100 but for type
    hints, checked in 1.163.2) is replaced by a subclass of the same name that
    only puts the request in a context variable (:func:`request_aware_servlet`).
    """
    from synapse.federation.transport import server as transport_server
    from synapse.federation.transport.server import federation as fed_servlets

    _SEND_JOIN_HOOKS.observer = observer
    _wrap_on_send_join_request()
    group = transport_server.SERVLET_GROUPS["federation"]
    if not any(getattr(cls, "_sps_send_join_servlet", False) for cls in group):
        native = fed_servlets.FederationV2SendJoinServlet
        servlet = request_aware_servlet(native)
        servlet._sps_send_join_servlet = True  # type: ignore[attr-defined]
        replace_federation_servlets({native: servlet})
        record_patch(
            PatchRecord(
                "synapse.federation.transport.server.SERVLET_GROUPS[federation]"
                ".FederationV2SendJoinServlet",
                "replace",
                "know when a partial /send_join answer has been sent",
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


def _memberships_txn(
    txn: Any, room_id: str, want_joined: bool
) -> tuple[list[str], list[str], list[str]]:
    """(bans and kicks, invites and knocks, joined oldest-first) in current state."""
    txn.execute(
        """
        SELECT c.state_key, c.membership, m.sender
        FROM current_state_events AS c
        INNER JOIN room_memberships AS m USING (event_id)
        WHERE c.room_id = ? AND c.type = 'm.room.member'
          AND c.membership IN ('ban', 'leave', 'invite', 'knock')
        ORDER BY c.event_stream_ordering DESC
        """,
        (room_id,),
    )
    power: list[str] = []
    pending: list[str] = []
    for user_id, membership, sender in txn:
        if membership == Membership.BAN or (
            membership == Membership.LEAVE and sender != user_id
        ):
            power.append(user_id)
        elif membership in (Membership.INVITE, Membership.KNOCK):
            pending.append(user_id)
    joined: list[str] = []
    if want_joined:
        txn.execute(
            """
            SELECT state_key FROM current_state_events
            WHERE room_id = ? AND type = 'm.room.member' AND membership = 'join'
            ORDER BY event_stream_ordering ASC
            """,
            (room_id,),
        )
        joined = [row[0] for row in txn]
    return power, pending, joined


async def essential_memberships(
    api: ModuleApi, room_id: str, want_joined: bool
) -> tuple[list[str], list[str], list[str]]:
    """From the room's current state: (bans and kicks still in force, pending
    invites and knocks, most recent first; joined members oldest-first, when
    ``want_joined``). Reads ``current_state_events`` joined with
    ``room_memberships`` (for each membership's sender) in one transaction."""
    return await main_store(api).db_pool.runInteraction(
        "sps_send_join_essentials", _memberships_txn, room_id, want_joined
    )
