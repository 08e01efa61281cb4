"""History during a resync (MSC2775's client side): ``/messages``, ``/context``
and ``/event`` of a partial-state room answer while a fake resident holds the
resync of a real joiner (``hs2``), with the visibility they have once complete.

The fake room has messages from before bob's join. hs2 has none of them while
the resync is held (the join brings state, not history; backfill waits for the
resync), so during it bob sees his join and what came after; once complete,
``/messages`` backfills and the room's history visibility decides whether the
messages from before the join are among the answer.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from synapse_partial_state.wire import SYNCING_FIELD
from tests.blackbox.resync_case import wait_until
from tests.blackbox.test_clients_partial_reads import PartialReadsCase
from tests.fedkit.testcase import on_both_databases

BEFORE = ["before 0", "before 1", "before 2"]


def room_path(room_id: str, *rest: str) -> str:
    tail = "/".join(quote(p, safe="") for p in rest)
    return f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/{tail}"


def bodies(events: list[dict[str, Any]]) -> list[str]:
    """The bodies of the messages among ``events``, oldest first."""
    return [
        e["content"]["body"] for e in reversed(events) if e["type"] == "m.room.message"
    ]


@on_both_databases
class HistoryDuringResync(PartialReadsCase):
    def test_shared(self) -> None:
        """shared: bob may see what came before his join; once complete,
        /messages backfills it."""
        self.check_history("shared", sees_before=True)

    def test_invited(self) -> None:
        """invited: bob was never invited, so nothing before his join."""
        self.check_history("invited", sees_before=False)

    def test_joined(self) -> None:
        """joined: nothing before his join."""
        self.check_history("joined", sees_before=False)

    def check_history(self, visibility: str, sees_before: bool) -> None:
        """Messages before the join, bob's held join, one message after it:
        during the resync /messages, /context and /event answer within seconds
        (stock: they wait for the resync); carol, a local non-member, gets
        stock's 404 for the event; /messages forward from where the backward page
        ended gives the same events; once complete, the same answers, plus (if
        visible) the messages from before the join."""
        self.HISTORY_VISIBILITY = visibility
        self.setup_room()
        carol = self.register(self.hs2, "carol")
        before_ids = [self.say(body) for body in BEFORE]
        rule = self.join_held()
        after_id = self.say("after")
        event = room_path(self.room_id, "event", after_id)
        wait_until(lambda: self.bob.get(event)[0] == 200, 30, "'after' at hs2")
        during = self.history(after_id)
        self.assertEqual(during["messages"], ["after"])
        self.assertIn(self.bob.user_id, during["members"])
        self.assertIs(during["context"][SYNCING_FIELD], True)
        self.assert_forward_same(during["page"])
        self.assertEqual(carol.get(event)[0], 404)
        self.assertTrue(self.partial())  # still held: nothing waited for it
        self.release(rule)
        expected = (BEFORE if sees_before else []) + ["after"]
        after = wait_until(
            lambda: (h := self.history(after_id))["messages"] == expected and h,
            60,
            f"/messages: {expected}",
        )
        self.assertIn(self.bob.user_id, after["members"])
        self.assertNotIn(SYNCING_FIELD, after["context"])
        self.assertEqual(carol.get(event)[0], 404)
        status, _ = self.bob.get(room_path(self.room_id, "event", before_ids[0]))
        self.assertEqual(status, 200 if sees_before else 404)
        # hs2 has them (backfilled): bob's view leaves them out by visibility.
        self.assertEqual(self.admin_messages()[: len(BEFORE)], BEFORE)

    def admin_messages(self) -> list[str]:
        """The room's message bodies at hs2, whoever may see them (admin API)."""
        path = f"/_synapse/admin/v1/rooms/{quote(self.room_id, safe='')}/messages"
        status, page = self.admin.get(path, params={"dir": "b", "limit": 50})
        self.assertEqual(status, 200, page)
        return bodies(page["chunk"])

    def say(self, body: str) -> str:
        """The fake resident's creator sends a message; its event ID."""
        sent = self.peer.send_event(
            self.room_id, "m.room.message", {"msgtype": "m.text", "body": body}
        )
        return str(sent["event_id"])

    def history(self, event_id: str) -> dict[str, Any]:
        """bob's /messages backward from the end, /context around ``event_id``
        and /event of it, each answering within seconds: the message bodies,
        the members who joined among the events, the /context answer."""
        page = self.get_at_once(room_path(self.room_id, "messages") + "?dir=b&limit=20")
        context = self.get_at_once(room_path(self.room_id, "context", event_id))
        self.assertEqual(context["event"]["event_id"], event_id)
        ids = [e["event_id"] for e in page["chunk"]]
        self.assertIn(event_id, ids)
        self.assertEqual(
            [e["event_id"] for e in context["events_before"]][:1], ids[1:2]
        )
        got = self.get_at_once(room_path(self.room_id, "event", event_id))
        self.assertEqual(got["content"]["body"], "after")
        return {
            "messages": bodies(page["chunk"]),
            "members": {
                e["state_key"]
                for e in page["chunk"]
                if e["type"] == "m.room.member"
                and e["content"].get("membership") == "join"
            },
            "context": context,
            "page": page,
        }

    def assert_forward_same(self, page: dict[str, Any]) -> None:
        """/messages forward from where ``page`` (backward) ended answers within
        seconds with the same events, oldest first."""
        path = room_path(self.room_id, "messages")
        forward = self.get_at_once(f"{path}?dir=f&limit=20&from={page['end']}")
        self.assertEqual(
            [e["event_id"] for e in forward["chunk"]],
            [e["event_id"] for e in reversed(page["chunk"])],
        )
