"""Big states given whole stored as a delta from the room's last big state group.

Synapse stores a state group as a delta from a previous group when it knows
one (the state it resolved across an event's prev events), and whole otherwise:
for an event with a missing prev event (the join's de-partial-stating, events
received or pulled during and after a resync) it is handed the state as one map
and writes every entry. In a room of 100,000 members each such group is 100,000
``state_groups_state`` rows: measured in the benchmark's resync, 3.7 to 7.4 s
of the resync's critical path per group (and ~15 MB of disk each), though the
state differed from the room's previous big group by a few entries.

:class:`StateGroupDeltas` remembers, per room, the last group this process
stored with a big state (:data:`MIN_ENTRIES` or more). When Synapse hands over
another big state whole, it reads that group's state (usually from Synapse's
state-group cache) and, if every key of it is still in the new state (a delta
cannot remove a key) and at most :data:`MAX_DELTA_FRACTION` of the entries
differ, stores the new group through Synapse's own delta path: Synapse then
reads it through the delta chain as it reads its own deltas, checks that the
previous group is not being deleted (and bumps it), and stores the state whole
past its chain-length limit. Anything else, or any failure of the delta
attempt, goes to Synapse's whole-state write as before.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import homeserver, wrap_instance_method

logger = logging.getLogger(__name__)

#: States given whole with fewer entries are stored as Synapse does.
MIN_ENTRIES = 500
#: A delta holding more than this fraction of the state is not worth it.
MAX_DELTA_FRACTION = 0.25
#: Rooms whose last big group is remembered (least recently stored dropped).
MAX_ROOMS = 1000

StateKey = tuple[str, str]


def delta_from(
    base: Mapping[StateKey, str], new: Mapping[StateKey, str]
) -> dict[StateKey, str] | None:
    """The entries of ``new`` that differ from ``base``, if ``new`` can be
    stored as that delta on top of ``base``: every key of ``base`` still in
    ``new`` (a delta only adds and replaces) and the delta at most
    :data:`MAX_DELTA_FRACTION` of ``new``. None otherwise."""
    if not base or len(base) > len(new):
        return None
    if any(key not in new for key in base):
        return None
    delta = {
        key: event_id for key, event_id in new.items() if base.get(key) != event_id
    }
    if len(delta) > MAX_DELTA_FRACTION * len(new):
        return None
    return delta


class StateGroupDeltas:
    """The wrapper of the state store's ``store_state_group`` (see the module
    docstring) and what it remembers."""

    def __init__(self, state_store: Any) -> None:
        self._store = state_store
        #: room -> the last group stored here with a big state
        self._last_big: OrderedDict[str, int] = OrderedDict()

    def install(self) -> None:
        wrap_instance_method(
            self._store,
            "store_state_group",
            self._wrap,
            "synapse.storage.databases.state.store.StateGroupDataStore."
            "store_state_group",
            "a big state given whole is stored as a delta from the room's last "
            "big state group when few entries differ",
        )

    def _remember(self, room_id: str, group: int) -> None:
        self._last_big[room_id] = group
        self._last_big.move_to_end(room_id)
        while len(self._last_big) > MAX_ROOMS:
            self._last_big.popitem(last=False)

    def _wrap(self, native: Callable[..., Any]) -> Callable[..., Any]:
        async def store_state_group(
            event_id: str,
            room_id: str,
            prev_group: int | None,
            delta_ids: Mapping[StateKey, str] | None,
            current_state_ids: Mapping[StateKey, str] | None,
        ) -> int:
            big = (
                current_state_ids is not None and len(current_state_ids) >= MIN_ENTRIES
            )
            if prev_group is None and big:
                assert current_state_ids is not None
                group = await self._as_delta(
                    native, event_id, room_id, current_state_ids
                )
                if group is None:
                    group = await native(
                        event_id, room_id, None, None, current_state_ids
                    )
                self._remember(room_id, group)
                return group
            group = await native(
                event_id, room_id, prev_group, delta_ids, current_state_ids
            )
            if big or (
                prev_group is not None and self._last_big.get(room_id) == prev_group
            ):
                # A big state, or a delta on top of one.
                self._remember(room_id, group)
            return group

        return store_state_group

    async def _as_delta(
        self,
        native: Callable[..., Any],
        event_id: str,
        room_id: str,
        state: Mapping[StateKey, str],
    ) -> int | None:
        base_group = self._last_big.get(room_id)
        if base_group is None:
            return None
        started = time.monotonic()
        try:
            groups = await self._store._get_state_for_groups([base_group])
        except Exception:
            logger.exception("Reading state group %d failed", base_group)
            return None
        delta = delta_from(groups.get(base_group) or {}, state)
        if delta is None:
            return None
        try:
            group = await native(event_id, room_id, base_group, delta, state)
        except Exception as e:
            # e.g. the base group is being deleted: store the state whole.
            logger.info(
                "State group for %s in %s not stored as a delta from %d (%s); "
                "storing it whole",
                event_id,
                room_id,
                base_group,
                e,
            )
            return None
        logger.info(
            "State of %d entries at %s in %s stored as a delta of %d from state "
            "group %d (group %d, %.2f s)",
            len(state),
            event_id,
            room_id,
            len(delta),
            base_group,
            group,
            time.monotonic() - started,
        )
        return group


def install_state_group_deltas(api: ModuleApi) -> StateGroupDeltas:
    deltas = StateGroupDeltas(homeserver(api).get_datastores().state)
    deltas.install()
    return deltas
