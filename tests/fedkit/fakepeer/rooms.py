"""The in-memory room DAG kept by the fake peer.

A :class:`Room` stores every event once, as compact JSON bytes plus a few
parsed fields (:class:`StoredEvent`), in the order the peer accepted them (the
"log"). Current state is a dict ``(type, state_key) -> event_id``; for every
state event the log remembers which event it replaced, so the state *before*
any event is obtained by copying the current state and undoing the log back to
that event. That is O(events after it), cheap for the recent events Synapse
asks about and still only tens of milliseconds at 100,000 members.

Events appended from elsewhere (joins and messages of real servers) may fork
the DAG; the fake peer does not run state resolution and simply applies state
in log order, which is good enough for a test double whose own events never
conflict.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from synapse.api.room_versions import RoomVersion
from synapse.event_auth import auth_types_for_event

from .keys import ServerKey
from .signing import JsonDict, event_id_of, finalize_event

MEMBER = "m.room.member"
CREATE = "m.room.create"
NAME = "m.room.name"
CANONICAL_ALIAS = "m.room.canonical_alias"

StateKey = tuple[str, str]

#: Marker in :attr:`Room._replaced` for non-state events.
_NOT_STATE = object()


def server_of(user_id: str) -> str:
    """The server name part of a user/room/event id."""
    return user_id.split(":", 1)[1]


class StoredEvent:
    """One event of a room: parsed essentials plus its JSON bytes."""

    __slots__ = (
        "index",
        "event_id",
        "type",
        "state_key",
        "sender",
        "membership",
        "auth_ids",
        "prev_ids",
        "depth",
        "json",
    )

    def __init__(
        self,
        event_id: str,
        pdu: JsonDict,
        auth_ids: tuple[str, ...],
        json_bytes: bytes,
    ) -> None:
        self.index = -1
        self.event_id = event_id
        self.type: str = pdu["type"]
        self.state_key: str | None = pdu.get("state_key")
        self.sender: str = pdu["sender"]
        content = pdu.get("content") or {}
        self.membership: str | None = (
            content.get("membership") if self.type == MEMBER else None
        )
        #: Effective auth event ids: includes the create event even in room
        #: versions (12+) where it is implicit.
        self.auth_ids = auth_ids
        self.prev_ids: tuple[str, ...] = tuple(pdu.get("prev_events") or ())
        self.depth: int = int(pdu.get("depth", 0))
        self.json = json_bytes

    def pdu(self) -> JsonDict:
        """The PDU as a fresh dict."""
        return json.loads(self.json)

    @property
    def state_tuple(self) -> StateKey | None:
        """``(type, state_key)`` for state events, else None."""
        if self.state_key is None:
            return None
        return (self.type, self.state_key)


class _AuthProto:
    """Just enough of an event for :func:`synapse.event_auth.auth_types_for_event`."""

    __slots__ = ("type", "sender", "state_key", "content")

    def __init__(
        self, type: str, sender: str, state_key: str | None, content: JsonDict
    ) -> None:
        self.type = type
        self.sender = sender
        self.state_key = state_key
        self.content = content


#: Order in which auth event types are listed in ``auth_events``.
_AUTH_ORDER = {CREATE: 0, "m.room.power_levels": 1, "m.room.join_rules": 2, MEMBER: 3}


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Room:
    """A room hosted by the fake peer."""

    def __init__(
        self,
        room_version: RoomVersion,
        creator: str,
        key_for: Callable[[str], ServerKey],
    ) -> None:
        self.room_version = room_version
        self.room_id: str = ""
        self.creator = creator
        self.resident = server_of(creator)
        #: Fake servers taking part in this room (they all serve its endpoints).
        self.fake_servers: list[str] = []
        self._key_for = key_for
        self.events: list[StoredEvent] = []
        self.by_id: dict[str, StoredEvent] = {}
        self.current: dict[StateKey, str] = {}
        self._replaced: list[object] = []
        self.extremities: dict[str, None] = {}
        #: Current membership per user, in order of first appearance.
        self.members: dict[str, str] = {}
        self.joined_per_server: Counter[str] = Counter()
        #: Servers left out of partial ``/send_join`` answers' ``servers_in_room``
        #: (a resident that omits servers; see ``/control/rooms/{id}/hide_servers``).
        self.hidden_servers: set[str] = set()
        self.create_event_id: str = ""
        self.build_seconds: float = 0.0

    # ------------------------------------------------------------------
    # Appending

    def append(
        self,
        event_id: str,
        pdu: JsonDict,
        json_bytes: bytes | None = None,
        apply_state: bool = True,
    ) -> StoredEvent:
        """Accept a finished (hashed, signed) PDU into the log and state.

        ``apply_state=False`` logs (and serves) the event without changing the
        current state, as a resident that rejected it would."""
        if event_id in self.by_id:
            return self.by_id[event_id]
        auth_ids = tuple(pdu.get("auth_events") or ())
        if pdu["type"] == CREATE and pdu.get("state_key") == "":
            self.create_event_id = event_id
            if not self.room_id:
                self.room_id = pdu.get("room_id") or "!" + event_id[1:]
        elif self.room_version.msc4291_room_ids_as_hashes and self.create_event_id:
            if self.create_event_id not in auth_ids:
                auth_ids = (self.create_event_id,) + auth_ids
        ev = StoredEvent(event_id, pdu, auth_ids, json_bytes or dumps(pdu))
        ev.index = len(self.events)
        self.events.append(ev)
        self.by_id[event_id] = ev
        key = ev.state_tuple
        if key is None or not apply_state:
            self._replaced.append(_NOT_STATE)
        else:
            self._replaced.append(self.current.get(key))
            self.current[key] = event_id
            if ev.membership is not None and ev.state_key is not None:
                self._apply_membership(ev.state_key, ev.membership)
        for prev in ev.prev_ids:
            self.extremities.pop(prev, None)
        self.extremities[event_id] = None
        return ev

    def _apply_membership(self, user_id: str, membership: str) -> None:
        old = self.members.get(user_id)
        if old == "join":
            self.joined_per_server[server_of(user_id)] -= 1
        if membership == "join":
            self.joined_per_server[server_of(user_id)] += 1
        self.members[user_id] = membership

    # ------------------------------------------------------------------
    # Building our own events

    def auth_ids_for(
        self, type: str, sender: str, state_key: str | None, content: JsonDict
    ) -> list[str]:
        """Auth events (listed form) for a new event against current state."""
        proto = _AuthProto(type, sender, state_key, content)
        if type == CREATE:
            return []
        keys = sorted(
            auth_types_for_event(self.room_version, proto),  # type: ignore[arg-type]
            key=lambda k: (_AUTH_ORDER.get(k[0], 9), k[1]),
        )
        ids: list[str] = []
        for k in keys:
            eid = self.current.get(k)
            if eid is not None and eid not in ids:
                ids.append(eid)
        if self.room_version.msc4291_room_ids_as_hashes and self.create_event_id in ids:
            ids.remove(self.create_event_id)
        return ids

    def new_event_dict(
        self,
        sender: str,
        type: str,
        content: JsonDict,
        state_key: str | None = None,
        origin_server_ts: int | None = None,
        prev_events: list[str] | None = None,
        auth_events: list[str] | None = None,
    ) -> JsonDict:
        """An unsigned event dict on top of the current forward extremities
        (or of ``prev_events``: e.g. an older event, to fork the DAG).

        ``auth_events`` replaces the auth events chosen against current state
        (e.g. to cite a membership the sender no longer has)."""
        prevs = prev_events if prev_events is not None else list(self.extremities)[-10:]
        depth = 1 + max(
            (self.by_id[p].depth for p in prevs if p in self.by_id), default=0
        )
        d: JsonDict = {
            "type": type,
            "sender": sender,
            "content": content,
            "depth": depth,
            "prev_events": prevs,
            "auth_events": (
                list(auth_events)
                if auth_events is not None
                else self.auth_ids_for(type, sender, state_key, content)
            ),
            "origin_server_ts": origin_server_ts or int(time.time() * 1000),
        }
        is_v12_create = (
            type == CREATE
            and state_key == ""
            and self.room_version.msc4291_room_ids_as_hashes
        )
        if not is_v12_create:
            d["room_id"] = self.room_id
        if state_key is not None:
            d["state_key"] = state_key
        return d

    def create_event(
        self,
        sender: str,
        type: str,
        content: JsonDict,
        state_key: str | None = None,
        origin_server_ts: int | None = None,
        auth_events: list[str] | None = None,
        apply_state: bool = True,
        prev_events: list[str] | None = None,
    ) -> StoredEvent:
        """Build, sign (by the sender's server) and append a new event
        (``auth_events``, ``prev_events``: see :meth:`new_event_dict`;
        ``apply_state``: see :meth:`append`)."""
        d = self.new_event_dict(
            sender,
            type,
            content,
            state_key,
            origin_server_ts,
            prev_events=prev_events,
            auth_events=auth_events,
        )
        key = self._key_for(server_of(sender))
        event_id = finalize_event(
            self.room_version, d, key.server_name, key.signing_key
        )
        return self.append(event_id, d, apply_state=apply_state)

    def accept_pdu(self, pdu: JsonDict) -> str:
        """Append a PDU received from elsewhere; returns its event id."""
        event_id = event_id_of(self.room_version, pdu)
        self.append(event_id, pdu)
        return event_id

    # ------------------------------------------------------------------
    # Queries

    def state_before(self, event_id: str) -> dict[StateKey, str]:
        """The room state before ``event_id`` (what Synapse's /state means)."""
        return self.state_before_index(self.by_id[event_id].index)

    def state_before_index(self, index: int) -> dict[StateKey, str]:
        """The state before the event at log position ``index``."""
        state = dict(self.current)
        events = self.events
        replaced = self._replaced
        for j in range(len(events) - 1, index - 1, -1):
            prev = replaced[j]
            if prev is _NOT_STATE:
                continue
            ev = events[j]
            key = (ev.type, ev.state_key)
            if prev is None:
                state.pop(key, None)  # type: ignore[arg-type]
            else:
                state[key] = prev  # type: ignore[index,assignment]
        return state

    def auth_chain(
        self, event_ids: Iterable[str], include_given: bool = False
    ) -> set[str]:
        """The transitive auth events of ``event_ids`` (known events only)."""
        by_id = self.by_id
        result: set[str] = set()
        stack: list[str] = []
        for eid in event_ids:
            ev = by_id.get(eid)
            if ev is None:
                continue
            if include_given:
                stack.append(eid)
            else:
                stack.extend(ev.auth_ids)
        while stack:
            eid = stack.pop()
            if eid in result:
                continue
            result.add(eid)
            ev = by_id.get(eid)
            if ev is not None:
                stack.extend(ev.auth_ids)
        return result

    def sorted_ids(self, event_ids: Iterable[str]) -> list[str]:
        """Known event ids in log order."""
        by_id = self.by_id
        return sorted(
            (e for e in event_ids if e in by_id), key=lambda e: by_id[e].index
        )

    def json_array(self, event_ids: Iterable[str]) -> bytes:
        """A JSON array of the given (known) events, as bytes."""
        by_id = self.by_id
        return b"[" + b",".join(by_id[e].json for e in event_ids if e in by_id) + b"]"

    def servers_in_room(self) -> list[str]:
        """Servers with at least one joined member (current state)."""
        return [s for s, n in self.joined_per_server.items() if n > 0]

    def joined_count(self) -> int:
        """Number of joined members in current state."""
        return sum(n for n in self.joined_per_server.values() if n > 0)

    def membership_counts(self) -> dict[str, int]:
        """Count of current memberships by membership value."""
        return dict(Counter(self.members.values()))

    def heroes(self, me: str, limit: int = 5) -> list[str]:
        """Hero users as Synapse picks them for unnamed rooms (approximately)."""
        joined: list[str] = []
        invited: list[str] = []
        gone: list[str] = []
        for user, membership in self.members.items():
            if user == me:
                continue
            if membership == "join":
                joined.append(user)
                if len(joined) >= limit:
                    break
            elif membership == "invite" and len(invited) < limit:
                invited.append(user)
            elif membership in ("leave", "ban") and len(gone) < limit:
                gone.append(user)
        if joined or invited:
            return (joined + invited)[:limit]
        return gone[:limit]

    def is_named(self) -> bool:
        """True when the room has a name or canonical alias in current state."""
        return (NAME, "") in self.current or (CANONICAL_ALIAS, "") in self.current

    def iter_after(self, index: int) -> Iterator[StoredEvent]:
        """Events with log position >= ``index``."""
        return iter(self.events[index:])
