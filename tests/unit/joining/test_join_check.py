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
    answer_needs,
    has_keys,
)

ROOM = "!r:res.org"
V10 = RoomVersions.V10


class _Event:
    """What the check reads of an event: its ID, type, auth events and pdu."""

    def __init__(self, event_id: str, pdu: dict[str, Any]) -> None:
        self.event_id = event_id
        self.type = pdu["type"]
        if "state_key" in pdu:
            self.state_key = pdu["state_key"]
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


class AnswerNeedsTests(unittest.TestCase):
    def needs(self, state: Any, chain: Any, joins: Any = (JOIN,)) -> Any:
        return answer_needs(state, chain, joins, "me.org")

    def test_the_join_needs_its_auth_events_and_the_non_member_state(self) -> None:
        needs = self.needs([CREATE, ALICE, PL, P, HERO, BAN], [CREATE, ALICE, P, B])
        # $pl (non-member state) and its auth chain ($create, $p).
        self.assertEqual(needs.required, {"$create", "$pl", "$p"})
        # Each essential with what only it needs: the ban needs alice's join
        # and the banned user's.
        self.assertEqual(
            dict(needs.optional),
            {
                "$alice": {"$alice"},
                "$hero": {"$hero"},
                "$ban": {"$ban", "$alice", "$b"},
            },
        )

    def test_left_out_takes_what_only_the_dropped_essentials_need(self) -> None:
        needs = self.needs([CREATE, ALICE, PL, P, HERO, BAN], [CREATE, ALICE, P, B])
        self.assertEqual(needs.left_out({"$hero"}), {"$hero"})
        # The banned user's join has no keys: the ban goes, alice's join stays
        # (an essential itself).
        self.assertEqual(needs.left_out({"$b"}), {"$ban", "$b"})
        self.assertEqual(needs.left_out({"$alice"}), {"$ban", "$alice", "$b"})
        self.assertEqual(needs.left_out(set()), set())

    def test_the_join_s_auth_events_are_required(self) -> None:
        join = member("$join", "@me:me.org", ["$create", "$hero"])
        needs = self.needs([CREATE, HERO], [CREATE], [join])
        self.assertEqual(needs.required, {"$create", "$hero"})
        self.assertEqual(dict(needs.optional), {})

    def test_our_own_users_memberships_are_required(self) -> None:
        ours = member("$ours", "@u:me.org", ["$create"])
        needs = self.needs([CREATE, ours], [CREATE], [])
        self.assertEqual(needs.required, {"$create", "$ours"})


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
        self.hint = True

    def hinted(self, room_id: str) -> bool:
        return self.hint

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
        self.check = JoinCheck(self.prefetch, object(), self.ops, "me.org")  # type: ignore[arg-type]
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
        # Still missing after the long wait: Synapse's own check fetches the
        # power levels' keys; the ban, whose auth chain has the banned user's
        # join (no keys either), is left out with it.
        self.assertEqual(outcome.left_out, {"$ban", "$b"})
        self.ops.stored = keys("res.org")
        self.prefetch.waited = 0
        self.assertEqual(self.run_check().left_out, {"$hero", "$ban", "$b"})

    def test_nothing_is_left_out_of_a_full_state(self) -> None:
        self.ops.stored = set()
        self.assertEqual(self.run_check(partial=False).left_out, frozenset())

    def test_once_the_prefetch_is_over_what_it_did_not_fetch_is_left_out(
        self,
    ) -> None:
        # A hero's server past the servers fetched for the join: no wait.
        self.prefetch.over_after = 0
        self.ops.stored = keys("res.org", "far.org", "bad.org")
        self.assertEqual(self.run_check().left_out, {"$hero"})
        self.assertEqual(len(self.prefetch.waits), 1)

    def test_nothing_is_left_out_without_a_hint(self) -> None:
        # A stock resident: Synapse's own check fetches every key, as stock.
        self.prefetch.hint = False
        self.assertEqual(self.run_check().left_out, frozenset())
