"""The partial ``/send_join`` answer's check (``joining/join_check.py``): which
essentials the join can go without, and which ones it leaves to the resync when
their signing keys are late."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from synapse.api.room_versions import RoomVersions
from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.joining.join_check import (
    JoinCheck,
    has_keys,
    optional_members,
)

ROOM = "!r:res.org"
V10 = RoomVersions.V10


class _Event:
    """What the check reads of an event: its ID, type, auth events and pdu."""

    def __init__(self, event_id: str, pdu: dict[str, Any]) -> None:
        self.event_id = event_id
        self.type = pdu["type"]
        self._pdu = pdu

    def auth_event_ids(self) -> list[str]:
        return list(self._pdu["auth_events"])

    def get_pdu_json(self) -> dict[str, Any]:
        return dict(self._pdu)


def event(
    event_id: str,
    type: str,
    sender: str,
    state_key: str | None = "",
    auth: Collection[str] = (),
    servers: Collection[str] | None = None,
    **content: Any,
) -> Any:
    d: dict[str, Any] = {
        "room_id": ROOM,
        "type": type,
        "sender": sender,
        "content": content,
        "auth_events": list(auth),
        "prev_events": [],
        "depth": 1,
        "origin_server_ts": 1,
        "hashes": {"sha256": "x"},
        "signatures": {
            s: {"ed25519:k": "sig"}
            for s in (servers if servers is not None else [sender.split(":", 1)[1]])
        },
    }
    if state_key is not None:
        d["state_key"] = state_key
    return _Event(event_id, d)


def member(event_id: str, user: str, auth: Collection[str] = (), **kw: Any) -> Any:
    return event(event_id, "m.room.member", user, user, auth, membership="join", **kw)


CREATE = event("$create", "m.room.create", "@a:res.org", room_version="10")
ALICE = member("$alice", "@a:res.org", ["$create"])
PL = event("$pl", "m.room.power_levels", "@p:far.org", auth=["$create", "$p"])
P = member("$p", "@p:far.org", ["$create"])
HERO = member("$hero", "@h:late.org", ["$create"])
BAN = event(
    "$ban",
    "m.room.member",
    "@a:res.org",
    "@b:bad.org",
    ["$alice", "$b"],
    membership="ban",
)
B = member("$b", "@b:bad.org", ["$create"])
JOIN = member("$join", "@me:me.org", ["$create", "$pl"])


class OptionalMembersTests(unittest.TestCase):
    def test_members_nothing_names_as_an_auth_event(self) -> None:
        state = [CREATE, ALICE, PL, P, HERO, BAN]
        chain = [CREATE, ALICE, P, B]
        # $p: in the auth chain (the power levels' sender); $alice: named by
        # the ban; $b: only in the auth chain; the ban itself and the hero:
        # nothing needs them.
        self.assertEqual(optional_members(state, chain, [JOIN]), {"$hero", "$ban"})

    def test_the_join_s_auth_events_are_kept(self) -> None:
        join = member("$join", "@me:me.org", ["$create", "$hero"])
        self.assertEqual(optional_members([CREATE, HERO], [CREATE], [join]), set())

    def test_non_member_state_is_never_optional(self) -> None:
        topic = event("$topic", "m.room.topic", "@a:res.org", topic="t")
        self.assertEqual(optional_members([topic], [], []), set())


class HasKeysTests(unittest.TestCase):
    def test_one_key_of_each_required_server(self) -> None:
        pdu = HERO.get_pdu_json()
        self.assertFalse(has_keys(pdu, {}, False, False))
        self.assertTrue(has_keys(pdu, {("late.org", "ed25519:k"): b""}, False, False))
        self.assertFalse(
            has_keys(pdu, {("late.org", "ed25519:other"): b""}, False, False)
        )

    def test_what_synapse_decides_counts_as_ready(self) -> None:
        unsigned = member("$u", "@u:x.org", servers=[])
        self.assertTrue(has_keys(unsigned.get_pdu_json(), {}, False, False))


class _Prefetch:
    def __init__(self) -> None:
        self.waits: list[float] = []
        self.over_after: float = 1.0
        self.waited = 0.0

    async def wait(self, room_id: str, seconds: float) -> bool:
        self.waits.append(seconds)
        self.waited += seconds
        return self.waited >= self.over_after


class _Ops:
    def __init__(self) -> None:
        self.stored: set[tuple[str, str]] = set()

    async def signing_keys(self, wanted: Collection[tuple[str, str]]) -> dict[Any, Any]:
        return {pair: (b"k", 0) for pair in wanted if pair in self.stored}

    async def needs_per_event_checks(self, room_id: str) -> bool:
        return True  # no bulk verification here: only what is left out


def keys(*servers: str) -> set[tuple[str, str]]:
    return {(s, "ed25519:k") for s in servers}


class JoinCheckTests(unittest.TestCase):
    def setUp(self) -> None:
        self.prefetch = _Prefetch()
        self.ops = _Ops()
        self.check = JoinCheck(self.prefetch, object(), self.ops)  # type: ignore[arg-type]
        self.state = [CREATE, ALICE, PL, P, HERO, BAN]
        self.chain = [CREATE, ALICE, P, B]

    def run_check(self, partial: bool = True) -> Any:
        return self.successResultOf(
            defer.ensureDeferred(
                self.check.before_check(
                    ROOM, V10, self.state, self.chain, [JOIN], partial
                )
            )
        )

    def test_late_keys_of_an_optional_member_leave_it_out(self) -> None:
        self.ops.stored = keys("res.org", "far.org", "bad.org")
        outcome = self.run_check()
        self.assertEqual(outcome.left_out, {"$hero"})
        self.assertEqual(len(self.prefetch.waits), 1)  # the short wait only

    def test_late_keys_the_answer_needs_are_waited_for(self) -> None:
        self.ops.stored = keys("res.org", "late.org")  # far.org's: the PL's
        outcome = self.run_check()
        self.assertEqual(len(self.prefetch.waits), 2)
        # Still missing after the long wait: Synapse's own check fetches them;
        # only the optional member without keys is left out.
        self.assertEqual(outcome.left_out, frozenset())
        self.ops.stored = keys("res.org")
        self.prefetch.waited = 0
        self.assertEqual(self.run_check().left_out, {"$hero"})

    def test_nothing_is_left_out_of_a_full_state(self) -> None:
        self.ops.stored = set()
        self.assertEqual(self.run_check(partial=False).left_out, frozenset())

    def test_nothing_is_left_out_once_the_prefetch_is_over(self) -> None:
        self.prefetch.over_after = 0
        self.assertEqual(self.run_check().left_out, frozenset())
