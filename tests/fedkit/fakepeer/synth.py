"""Building big synthetic rooms quickly.

The DAG is linear (each event's only prev event is the previous one); every
event is hashed and signed by its sender's fake server through Synapse's own
signing code, and its auth events are chosen against the running state with
Synapse's ``auth_types_for_event``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

from .keys import ServerKey
from .rooms import Room


class RoomSpecError(ValueError):
    """The room specification is invalid."""


@dataclass
class RoomSpec:
    """What to put in a synthetic room (see the control API docs)."""

    room_version: str = "10"
    members: int = 10
    servers: int = 1
    name: str | None = "Fake room"
    topic: str | None = None
    alias: bool = False
    bans: int = 0
    kicks: int = 0
    invites: int = 0
    knocks: int = 0
    power_users: int = 0
    acl: bool = False
    history_visibility: str = "shared"
    join_rule: str | None = None
    #: The create event's ``type`` (e.g. ``m.space``); None: none.
    room_type: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RoomSpec:
        """Parse a control API body, rejecting unknown fields."""
        spec = cls()
        for k, v in body.items():
            if not hasattr(spec, k):
                raise RoomSpecError(f"unknown room field {k!r}")
            setattr(spec, k, v)
        spec.room_version = str(spec.room_version)
        if spec.room_version not in KNOWN_ROOM_VERSIONS:
            raise RoomSpecError(f"unknown room version {spec.room_version!r}")
        if KNOWN_ROOM_VERSIONS[spec.room_version].event_format < 2:
            raise RoomSpecError("room versions 1 and 2 are not supported")
        for f in (
            "members",
            "servers",
            "bans",
            "kicks",
            "invites",
            "knocks",
            "power_users",
        ):
            val = getattr(spec, f)
            if not isinstance(val, int) or val < 0:
                raise RoomSpecError(f"{f} must be a non-negative integer")
        if spec.servers < 1:
            raise RoomSpecError("servers must be >= 1")
        if spec.knocks and not KNOWN_ROOM_VERSIONS[spec.room_version].knock_join_rule:
            raise RoomSpecError(
                f"room version {spec.room_version} does not support knocking"
            )
        return spec


def build_room(
    spec: RoomSpec, servers: list[ServerKey], key_for: Callable[[str], ServerKey]
) -> Room:
    """Build the room described by ``spec`` over ``servers`` (server 0 is resident).

    Pure computation: safe to run in a thread as long as the room is not yet
    visible to anything else.
    """
    started = time.monotonic()
    rv = KNOWN_ROOM_VERSIONS[spec.room_version]
    names = [s.server_name for s in servers]
    resident = names[0]
    creator = f"@creator:{resident}"
    room = Room(rv, creator, key_for)
    room.fake_servers = list(names)
    if not rv.msc4291_room_ids_as_hashes:
        room.room_id = f"!{secrets.token_urlsafe(12)}:{resident}"

    # Rough event count, to give events past (increasing) timestamps.
    total = (
        10 + spec.members + 2 * (spec.bans + spec.kicks) + spec.invites + spec.knocks
    )
    ts = int(time.time() * 1000) - total - 1000

    def emit(
        sender: str, type: str, content: dict[str, Any], state_key: str | None = None
    ) -> None:
        nonlocal ts
        ts += 1
        room.create_event(sender, type, content, state_key, origin_server_ts=ts)

    def user(prefix: str, i: int) -> str:
        return f"@{prefix}{i}:{names[i % len(names)]}"

    create_content: dict[str, Any] = {"room_version": rv.identifier}
    if not rv.implicit_room_creator:
        create_content["creator"] = creator
    if spec.room_type is not None:
        create_content["type"] = spec.room_type
    emit(creator, "m.room.create", create_content, "")
    emit(
        creator,
        "m.room.member",
        {"membership": "join", "displayname": "creator"},
        creator,
    )

    pl_users: dict[str, int] = {}
    if not rv.msc4289_creator_power_enabled:
        pl_users[creator] = 100
    for i in range(spec.power_users):
        pl_users[user("u", i)] = 50
    emit(
        creator,
        "m.room.power_levels",
        {
            "users": pl_users,
            "users_default": 0,
            "events": {
                "m.room.name": 50,
                "m.room.power_levels": 100,
                "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50,
                "m.room.server_acl": 100,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": 0,
        },
        "",
    )
    emit(creator, "m.room.join_rules", {"join_rule": "public"}, "")
    emit(
        creator,
        "m.room.history_visibility",
        {"history_visibility": spec.history_visibility},
        "",
    )
    if spec.name is not None:
        emit(creator, "m.room.name", {"name": spec.name}, "")
    if spec.topic is not None:
        emit(creator, "m.room.topic", {"topic": spec.topic}, "")
    if spec.alias:
        alias = f"#fake{secrets.token_hex(4)}:{resident}"
        emit(creator, "m.room.canonical_alias", {"alias": alias}, "")
    if spec.acl:
        emit(
            creator,
            "m.room.server_acl",
            {"allow": ["*"], "deny": ["evil.example.org"], "allow_ip_literals": True},
            "",
        )

    for i in range(spec.members):
        u = user("u", i)
        emit(u, "m.room.member", {"membership": "join", "displayname": f"u{i}"}, u)
    for i in range(spec.bans):
        u = user("banned", i)
        emit(u, "m.room.member", {"membership": "join"}, u)
        emit(creator, "m.room.member", {"membership": "ban", "reason": "fake ban"}, u)
    for i in range(spec.kicks):
        u = user("kicked", i)
        emit(u, "m.room.member", {"membership": "join"}, u)
        emit(
            creator, "m.room.member", {"membership": "leave", "reason": "fake kick"}, u
        )
    for i in range(spec.invites):
        u = user("invited", i)
        emit(creator, "m.room.member", {"membership": "invite"}, u)
    if spec.knocks:
        emit(creator, "m.room.join_rules", {"join_rule": "knock"}, "")
        for i in range(spec.knocks):
            u = user("knocker", i)
            emit(u, "m.room.member", {"membership": "knock"}, u)
    final_rule = spec.join_rule
    current_rule = "knock" if spec.knocks else "public"
    if final_rule is not None and final_rule != current_rule:
        emit(creator, "m.room.join_rules", {"join_rule": final_rule}, "")

    room.build_seconds = time.monotonic() - started
    return room
