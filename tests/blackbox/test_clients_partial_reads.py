"""Reads that answer during a resync (MSC2775's client side), against a real
joiner (``hs2``) and a fake resident holding the resync: ``/members`` and
``/joined_members`` under ``clients.members_during_resync`` (``partial`` for an
unencrypted room; ``block``, the default, and any encrypted room: stock's wait),
and ``/hierarchy`` of a space, which answers from the partial state.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import requests

from synapse_partial_state.wire import SUMMARY_FIELD, SYNCING_FIELD
from tests.blackbox.resync_case import FAST, STATE_PATHS, ResyncCase, wait_until
from tests.blackbox.test_clients import endpoint
from tests.fedkit.testcase import on_both_databases

#: FAST, with members answered from partial state.
PARTIAL: dict[str, Any] = {
    **FAST,
    "module_config": {
        "resync": {"initial_backoff_seconds": 0.5, "max_backoff_seconds": 2},
        "clients": {"members_during_resync": "partial"},
    },
}
#: How long a request that blocks is given before the test calls it blocked.
BLOCKED_AFTER = 4.0


def members_path(room_id: str) -> str:
    return f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/members"


def joined_path(room_id: str) -> str:
    return f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/joined_members"


def hierarchy_path(room_id: str) -> str:
    return f"/_matrix/client/v1/rooms/{quote(room_id, safe='')}/hierarchy"


class PartialReadsCase(ResyncCase):
    MEMBERS = 60
    SERVERS = 3

    def join_held(self, held: str = STATE_PATHS) -> str:
        """bob joins with the resync held (the resident holds requests for
        ``held``); returns the hold's rule."""
        rule = self.peer.add_behaviour(held, "hold")
        self.bob.join(self.room_id, via=[self.resident])
        self.assertTrue(self.partial())
        return rule

    def partial(self) -> bool:
        status, body = self.bob.get(endpoint(self.room_id))
        self.assertEqual(status, 200, body)
        return bool(body["syncing"])

    def release(self, rule: str) -> None:
        self.peer.remove_behaviour(rule)
        wait_until(lambda: not self.partial(), 120, "complete")

    def get_at_once(self, path: str) -> Any:
        """``path``'s 200 answer, which must come within a few seconds."""
        started = time.monotonic()
        status, body = self.bob.get(path, timeout=15)
        self.assertEqual(status, 200, body)
        self.assertLess(time.monotonic() - started, 10)
        return body

    def assert_blocks(self, path: str) -> None:
        """A request for ``path`` does not answer within :data:`BLOCKED_AFTER`."""
        with self.assertRaises(requests.exceptions.Timeout, msg=path):
            self.bob.get(path, timeout=BLOCKED_AFTER)

    def assert_full_answers(self) -> None:
        """Once complete: every member, no marker (stock's answers)."""
        members = self.get_at_once(members_path(self.room_id))
        joined = self.get_at_once(joined_path(self.room_id))
        expected = self.room["member_count"] + 1
        self.assertEqual(len(joined["joined"]), expected)
        self.assertGreaterEqual(len(members["chunk"]), expected)
        for body in (members, joined):
            self.assertNotIn(SYNCING_FIELD, body)
            self.assertNotIn(SUMMARY_FIELD, body)


@on_both_databases(ci_database="postgres")
class MembersDuringResync(PartialReadsCase):
    def test_partial_answers_at_once_with_the_marker(self) -> None:
        """With ``partial``, while the resync is held, /members and
        /joined_members of an unencrypted room answer at once with the members
        known so far (bob among them, fewer than the room has), marked syncing,
        with the summary counts; once complete, stock's full answers."""
        self.setup_room(**PARTIAL)
        rule = self.join_held()
        members = self.get_at_once(members_path(self.room_id))
        joined = self.get_at_once(joined_path(self.room_id))
        for body in (members, joined):
            self.assertIs(body[SYNCING_FIELD], True)
            counts = body[SUMMARY_FIELD]
            self.assertEqual(
                set(counts), {"m.joined_member_count", "m.invited_member_count"}
            )
            self.assertGreaterEqual(counts["m.joined_member_count"], 1)
        users = {e["state_key"] for e in members["chunk"]}
        self.assertIn(self.bob.user_id, users)
        self.assertIn(self.bob.user_id, joined["joined"])
        full = self.room["member_count"] + 1
        self.assertLess(len(joined["joined"]), full)  # the members known so far
        self.assertEqual(
            joined[SUMMARY_FIELD]["m.joined_member_count"], len(joined["joined"])
        )
        self.assertTrue(self.partial())  # still held: nothing waited for it
        self.release(rule)
        self.assert_full_answers()

    def test_encrypted_room_blocks_even_with_partial(self) -> None:
        """With ``partial``, an encrypted room's /members and /joined_members
        still wait for the full state, then answer in full."""
        self.setup_room(**PARTIAL)
        self.peer.send_event(
            self.room_id,
            "m.room.encryption",
            {"algorithm": "m.megolm.v1.aes-sha2"},
            state_key="",
        )
        rule = self.join_held()
        self.assert_blocks(members_path(self.room_id))
        self.assert_blocks(joined_path(self.room_id))
        self.release(rule)
        self.assert_full_answers()

    def test_default_blocks(self) -> None:
        """Without the option (``block``): both wait, as stock."""
        self.setup_room()
        rule = self.join_held()
        self.assert_blocks(members_path(self.room_id))
        self.assert_blocks(joined_path(self.room_id))
        self.release(rule)
        self.assert_full_answers()


@on_both_databases(ci_database="sqlite")
class HierarchyDuringResync(PartialReadsCase):
    CHILDREN = 3
    ROOM_TYPE = "m.space"

    def test_hierarchy_answers_from_partial_state(self) -> None:
        """A space (the fake resident's room with m.space.child events): while
        its resync is held, /hierarchy answers within seconds with the space and
        its children's events; after completion the answer is the same."""
        self.setup_room()
        children = {f"!child{n}:{self.resident}" for n in range(self.CHILDREN)}
        for child in sorted(children):
            self.peer.send_event(
                self.room_id,
                "m.space.child",
                {"via": [self.resident]},
                state_key=child,
            )
        rule = self.join_held()
        during = self.get_at_once(hierarchy_path(self.room_id))
        self.assertTrue(self.partial())
        self.assertEqual(self.space_children(during), children)
        self.release(rule)
        after = self.get_at_once(hierarchy_path(self.room_id))
        self.assertEqual(self.space_children(after), children)
        self.assertEqual(
            [r["room_id"] for r in after["rooms"]],
            [r["room_id"] for r in during["rooms"]],
        )

    def test_hierarchy_access_rules_during_resync(self) -> None:
        """Stock's access rules, read from the partial state: during the held
        resync a local user not in the space sees it while it is public, and
        gets 403 once it turns invite-only, while bob, a member, still gets the
        answer."""
        self.setup_room()
        carol = self.register(self.hs2, "carol")
        rule = self.join_held()
        status, body = carol.get(hierarchy_path(self.room_id), timeout=15)
        self.assertEqual(status, 200, body)  # public: anyone may look
        self.peer.send_event(
            self.room_id, "m.room.join_rules", {"join_rule": "invite"}, state_key=""
        )
        wait_until(
            lambda: (
                self.bob.state_event(self.room_id, "m.room.join_rules")
                == {"join_rule": "invite"}
            ),
            30,
            "the invite-only rule at hs2",
        )
        status, body = carol.get(hierarchy_path(self.room_id), timeout=15)
        self.assertEqual(status, 403, body)
        self.assertEqual(
            self.get_at_once(hierarchy_path(self.room_id))["rooms"][0]["room_id"],
            self.room_id,
        )
        self.assertTrue(self.partial())
        self.release(rule)

    def space_children(self, body: dict[str, Any]) -> set[str]:
        """The state keys of the space's m.space.child events in the answer."""
        space = body["rooms"][0]
        self.assertEqual(space["room_id"], self.room_id)
        return {
            e["state_key"]
            for e in space["children_state"]
            if e["type"] == "m.space.child"
        }
