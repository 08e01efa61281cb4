"""The state-resolution seam: identical state sets resolve to themselves."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import homeserver, wrap_instance_method

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.types import StateMap

logger = logging.getLogger(__name__)


def identical_state_sets(state_sets: Sequence[Mapping[Any, str]]) -> bool:
    """Whether there are at least two state maps and all are equal."""
    if len(state_sets) < 2:
        return False
    first = state_sets[0]
    return all(other == first for other in state_sets[1:])


def install_identical_state_shortcut(api: ModuleApi) -> None:
    """Resolve identical state sets without running state resolution.

    After a resync, events received during it often sit in state groups that hold
    exactly the same state (one from the engine's fetch, one from a ``/state_ids``
    Synapse asked for an event with missing prev events), and a later event with
    both as prev events makes Synapse resolve them: state resolution v2 of two
    100,000-member states took 9.5 s, holding the room's persistence queue (a
    joiner's ``/send_join`` waited behind it). Resolving any number of identical
    state maps gives that map (every key unconflicted, auth difference empty, in
    every room version), so this returns a copy of it at once; Synapse then
    reuses the matching state group (``_make_state_cache_entry``).

    Wraps ``StateResolutionHandler.resolve_events_with_store`` on this
    homeserver's instance (signature unchanged in 1.163)."""

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def resolve_events_with_store(
            room_id: str,
            room_version: str,
            state_sets: Sequence[StateMap[str]],
            event_map: dict[str, EventBase] | None,
            state_res_store: Any,
        ) -> StateMap[str]:
            if identical_state_sets(state_sets):
                logger.info(
                    "State resolution in %s skipped: %d identical state sets of %d "
                    "entries",
                    room_id,
                    len(state_sets),
                    len(state_sets[0]),
                )
                return dict(state_sets[0])
            return await native(
                room_id, room_version, state_sets, event_map, state_res_store
            )

        return resolve_events_with_store

    wrap_instance_method(
        homeserver(api).get_state_resolution_handler(),
        "resolve_events_with_store",
        wrap,
        "synapse.state.StateResolutionHandler.resolve_events_with_store",
        "identical state sets resolve to themselves without state resolution",
    )
