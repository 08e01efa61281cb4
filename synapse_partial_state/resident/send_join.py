"""MSC3706 partial ``/send_join`` answers with MSC2775's essential members.

Native Synapse answers a partial join with all non-member state, the joiner's own
previous membership and, for rooms without a name or alias, the heroes. We add, in
priority order and under a total cap:

1. heroes (also for named rooms: clients compute summaries from them);
2. members named in ``m.room.power_levels`` ``users``;
3. memberships that are power events: bans, and kicks still in force;
4. pending invites and knocks (so nobody is invited twice);
5. ``members_per_server`` joined members of every server, longest-standing first.

Candidates come from the room's current state, read once Synapse has accepted and
stored the join, never for a join it refuses (the heroes from the room summary
native code computes for its own choice, also after the join); the selector
then keeps only the member events that are in the state *before the join*, so the
answer is always a true subset of that state. An ``org.matrix.msc2775.summary``
block gives the joiner the heroes and member counts at once.

The ``/make_join`` answer names the servers whose signing keys the joiner will
need to check the partial answer (``org.matrix.msc2775.signing_servers``: who sent
the non-member state, the essentials and their memberships), so that a module
joiner fetches them while we validate its join. They are read from the room's
current state once per new event in the room (at most every
:data:`SIGNING_SERVERS_TTL_S` in a quiet room): a flood of ``/make_join``
requests costs one read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from synapse.api.constants import EventTypes, Membership
from synapse.module_api import ModuleApi
from synapse.types import get_domain_from_id

from synapse_partial_state.compat.make_join import (
    forward_extremities,
    state_senders,
)
from synapse_partial_state.compat.send_join import (
    essential_memberships,
    get_current_state_event_content,
    get_room_summary,
    heroes_from_summary,
)
from synapse_partial_state.config import ResidentConfig
from synapse_partial_state.wire import MAX_SIGNING_SERVERS, SUMMARY_FIELD

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.storage.roommember import MemberSummary
    from synapse.types import StateMap

logger = logging.getLogger(__name__)

#: How long the servers named in a room's ``/make_join`` answers are reused.
SIGNING_SERVERS_TTL_S = 30.0
#: Rooms whose ``/make_join`` servers are remembered at once.
_SIGNING_SERVERS_ROOMS = 1000


def select_partial_state(
    join_event: EventBase,
    prev_state_ids: StateMap[str],
    summary: Mapping[str, MemberSummary],
    extras: Collection[str],
    cap: int,
) -> set[str]:
    """The event IDs of the partial state for ``join_event``.

    Everything that is not ``m.room.member``, the joiner's own previous membership,
    then up to ``cap`` member events of the users in ``extras`` (in order) that are
    in the state before the join.
    """
    state = {
        event_id
        for (event_type, _), event_id in prev_state_ids.items()
        if event_type != EventTypes.Member
    }
    own = prev_state_ids.get((EventTypes.Member, join_event.state_key))
    if own is not None:
        state.add(own)
    added = 0
    for user_id in extras:
        if added >= cap:
            break
        event_id = prev_state_ids.get((EventTypes.Member, user_id))
        if event_id is not None and event_id not in state:
            state.add(event_id)
            added += 1
    return state


def order_candidates(
    heroes: Iterable[str],
    power_users: Iterable[str],
    power_memberships: Iterable[str],
    pending: Iterable[str],
    per_server: Iterable[str],
) -> tuple[str, ...]:
    """Concatenate the categories in priority order, dropping repeats."""
    seen: dict[str, None] = {}
    for group in (heroes, power_users, power_memberships, pending, per_server):
        for user_id in group:
            seen.setdefault(user_id, None)
    return tuple(seen)


def pick_per_server(joined_oldest_first: Iterable[str], per_server: int) -> list[str]:
    """The first ``per_server`` users of every server, keeping the input order."""
    counts: dict[str, int] = {}
    picked = []
    for user_id in joined_oldest_first:
        try:
            server = get_domain_from_id(user_id)
        except Exception:
            continue
        if counts.get(server, 0) < per_server:
            counts[server] = counts.get(server, 0) + 1
            picked.append(user_id)
    return picked


def signing_servers_of(senders: Iterable[str]) -> list[str]:
    """The servers of ``senders`` (user IDs), in the order they first come, at
    most :data:`~synapse_partial_state.wire.MAX_SIGNING_SERVERS` (ours
    included: the joiner needs our keys too). The joiner fetches their keys in
    that order, and waits only a moment for those of the essentials
    (``joining/join_check.py``): the servers its join needs come first, then
    those of the essentials by priority."""
    servers: dict[str, None] = {}
    for user_id in senders:
        try:
            servers.setdefault(get_domain_from_id(user_id))
        except Exception:
            continue
    return list(servers)[:MAX_SIGNING_SERVERS]


def _power_users(content: Mapping[str, Any] | None) -> list[str]:
    users = (content or {}).get("users")
    if not isinstance(users, Mapping):
        return []
    return [u for u in users if isinstance(u, str) and u.startswith("@")]


class SendJoinEnricher:
    """Chooses and adds the MSC2775 essentials to partial ``/send_join`` answers."""

    def __init__(self, api: ModuleApi, config: ResidentConfig) -> None:
        self._api = api
        self._config = config
        #: room ID -> (read at, monotonic s; the room's forward extremities then;
        #: the servers named in /make_join answers)
        self._signing_servers: dict[str, tuple[float, frozenset[str], list[str]]] = {}

    def select(
        self,
        join_event: EventBase,
        prev_state_ids: StateMap[str],
        summary: Mapping[str, MemberSummary],
        extras: tuple[str, ...],
    ) -> Collection[str]:
        """The partial state: the heroes (from the room summary native code hands
        over, computed after the join is persisted: the joiner is not among its
        heroes), then ``extras``."""
        cfg = self._config
        cap = cfg.max_extra_members if cfg.enabled else 0
        heroes: list[str] = []
        if cap and cfg.heroes:
            heroes = heroes_from_summary(summary, join_event.state_key)
        return select_partial_state(
            join_event,
            prev_state_ids,
            summary,
            order_candidates(heroes, extras, (), (), ()),
            cap,
        )

    async def signing_servers(self, room_id: str, joiner: str) -> list[str]:
        """For a ``/make_join`` answer Synapse gives: the servers of who sent the
        room's current non-member state, and of the essentials (heroes included)
        and who sent their memberships. Read again only once the room has a new
        event, or after :data:`SIGNING_SERVERS_TTL_S` (the essentials do not
        change with each joiner: a joiner's own membership is not among them)."""
        cfg = self._config
        now = time.monotonic()
        extremities = await forward_extremities(self._api, room_id)
        cached = self._signing_servers.get(room_id)
        if (
            cached is not None
            and cached[1] == extremities
            and now - cached[0] < SIGNING_SERVERS_TTL_S
        ):
            return cached[2]
        users: list[str] = []
        if cfg.enabled and cfg.max_extra_members:
            if cfg.heroes:
                summary = await get_room_summary(self._api, room_id)
                users = heroes_from_summary(summary, joiner)
            users.extend(await self._candidates(room_id))
            users = list(dict.fromkeys(users))[: cfg.max_extra_members]
        state, membership_senders = await state_senders(self._api, room_id, users)
        # Who sent the non-member state (the join needs those), then each
        # essential's server and who sent its membership (a ban's or an
        # invite's sender), by priority.
        in_order = list(state)
        for user_id in users:
            in_order.append(user_id)
            sender = membership_senders.get(user_id)
            if sender is not None:
                in_order.append(sender)
        servers = signing_servers_of(in_order)
        if len(self._signing_servers) >= _SIGNING_SERVERS_ROOMS:
            self._signing_servers.clear()
        self._signing_servers[room_id] = (now, extremities, servers)
        return servers

    async def extras_for(self, room_id: str, joiner: str) -> tuple[str, ...]:
        """Essential member user IDs for a partial join of ``joiner``, in order,
        except the heroes: :meth:`select` puts them first, from the summary native
        code hands it. Called only once Synapse has accepted and stored the join
        (a refused ``/send_join`` reads nothing): ``joiner`` may be among the
        joined members then, which changes nothing, as :meth:`select` counts the
        joiner's own membership apart."""
        extras = await self._candidates(room_id)
        # Says each time a join made us read the room's memberships, and for whom.
        logger.debug(
            "send_join essentials for %s in %s: %d candidates",
            joiner,
            room_id,
            len(extras),
        )
        return extras

    async def _candidates(self, room_id: str) -> tuple[str, ...]:
        """The essentials but the heroes, in order, from the current state."""
        cfg = self._config
        if not cfg.enabled or cfg.max_extra_members == 0:
            return ()
        power_users: list[str] = []
        if cfg.power_level_users:
            content = await get_current_state_event_content(
                self._api, room_id, EventTypes.PowerLevels, ""
            )
            power_users = _power_users(content)
        power, pending, joined = await essential_memberships(
            self._api, room_id, cfg.members_per_server > 0
        )
        return order_candidates(
            (),
            power_users,
            power if cfg.bans_and_kicks else (),
            pending if cfg.invites_and_knocks else (),
            pick_per_server(joined, cfg.members_per_server),
        )

    async def response_fields(self, room_id: str, joiner: str) -> Mapping[str, Any]:
        """The ``org.matrix.msc2775.summary`` block, when enabled."""
        if not (self._config.enabled and self._config.summary):
            return {}
        summary = await get_room_summary(self._api, room_id)
        joined = summary.get(Membership.JOIN)
        invited = summary.get(Membership.INVITE)
        return {
            SUMMARY_FIELD: {
                "m.heroes": heroes_from_summary(summary, joiner),
                "m.joined_member_count": joined.count if joined else 0,
                "m.invited_member_count": invited.count if invited else 0,
            }
        }
