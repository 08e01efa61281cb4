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
    # @cached descriptors confuse mypy's view of the bound method.
    return await main_store(api).get_room_summary(room_id)  # type: ignore[call-arg,arg-type,misc]


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
