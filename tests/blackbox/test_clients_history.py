"""History during a resync (MSC2775's client side): ``/messages``, ``/context``
and ``/event`` of a partial-state room answer while a fake resident holds the
resync of a real joiner (``hs2``), with the visibility they have once complete.

The fake room has messages from before bob's join, behind more history than one
``/backfill`` returns (so that Synapse needs the state before the oldest
backfilled event). The resync is held at its ``/state`` request (its
``/state_ids`` goes through, as do backfill's). During it, ``/messages`` backfills
the history from before the join from the resident, and the room's history
visibility (at each event: it may change along the way) decides which of the
messages bob sees; once complete, the same answers.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from synapse_partial_state.wire import SYNCING_FIELD
from tests.blackbox.resync_case import FAST, STATE_PATH, wait_until
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


#: The resident's /backfill.
BACKFILL_PATH = r"^/_matrix/federation/v1/backfill/"

#: FAST, with a page waiting for its whole backfill (as stock): the tests of
#: what bob sees compare a single page with what he sees after the resync.
WHOLE_PAGES: dict[str, Any] = {
    **FAST,
    "module_config": {
        "resync": {"initial_backoff_seconds": 0.5, "max_backoff_seconds": 2},
        "clients": {"history_wait_seconds": 300},
    },
}


class HistoryCase(PartialReadsCase):
    #: More member events than one /backfill (100 events) reaches back through.
    MEMBERS = 150

    def partial_state_events(self) -> int:
        """How many of the room's events have partial state at hs2."""
        rows = self.hs2.sql(
            "SELECT COUNT(*) FROM partial_state_events WHERE room_id = ?",
            (self.room_id,),
        )
        return int(rows[0][0])

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
        and /event of it: the message bodies, the members who joined among the
        events, the /context answer. /context and /event answer within seconds;
        /messages backfills (up to 100 events from the resident, each processed
        by Synapse as stock does after the resync: seconds on a loaded machine),
        so it is given longer (the callers check that the resync is still held
        after it: it did not wait for it)."""
        status, page = self.bob.get(
            room_path(self.room_id, "messages") + "?dir=b&limit=20", timeout=120
        )
        self.assertEqual(status, 200, page)
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


@on_both_databases(ci_database="postgres")
class HistoryDuringResync(HistoryCase):
    def test_shared(self) -> None:
        """shared: bob may see what came before his join."""
        self.check_history("shared", [], sees_before=True)

    def test_invited(self) -> None:
        """invited: bob was never invited, so nothing before his join."""
        self.check_history("invited", [], sees_before=False)

    def test_joined(self) -> None:
        """joined: nothing before his join."""
        self.check_history("joined", [], sees_before=False)

    def test_visibility_changed_before_the_join(self) -> None:
        """joined, then "hidden" messages, then shared: bob sees the messages
        sent under shared, not the earlier ones (the state before the oldest
        backfilled event has the earlier visibility, which hs2 did not have)."""
        self.check_history("joined", ["hidden 0", "shared"], sees_before=True)

    def test_visibility_restricted_before_the_join(self) -> None:
        """shared, then "seen" messages, then joined: bob sees the messages
        sent under shared, not those sent under joined."""
        self.check_history(
            "shared", ["seen 0", "joined"], sees_before=False, seen=["seen 0"]
        )

    def check_history(
        self,
        visibility: str,
        earlier: list[str],
        sees_before: bool,
        seen: list[str] | None = None,
    ) -> None:
        """``earlier`` (messages, and history visibility values to switch to),
        then the messages of :data:`BEFORE`, bob's join with the resync held,
        one message after it: during the resync /messages, /context and /event
        answer within seconds, /messages with the messages from before the join
        bob may see (``seen``, then :data:`BEFORE` if ``sees_before``) backfilled
        from the resident, and those events have partial state; carol, a local
        non-member, gets stock's 404 for the event; /messages forward from where
        the backward page ended gives the same events; once complete, the same
        answers, and no event has partial state."""
        self.HISTORY_VISIBILITY = visibility
        self.setup_room(**WHOLE_PAGES)
        carol = self.register(self.hs2, "carol")
        for item in earlier:
            if " " in item:
                self.say(item)
            else:
                self.peer.send_event(
                    self.room_id,
                    "m.room.history_visibility",
                    {"history_visibility": item},
                    state_key="",
                )
        before_ids = [self.say(body) for body in BEFORE]
        rule = self.join_held(STATE_PATH)
        after_id = self.say("after")
        event = room_path(self.room_id, "event", after_id)
        wait_until(lambda: self.bob.get(event)[0] == 200, 30, "'after' at hs2")
        expected = (seen or []) + (BEFORE if sees_before else []) + ["after"]
        since = self.hs2.log_offset()
        during = self.history(after_id)
        self.assertEqual(during["messages"], expected)
        # the state before the oldest backfilled event: a partial state
        self.hs2.wait_for_log(r"state at \S+ narrowed to", timeout=10, since=since)
        self.assertIn(self.bob.user_id, during["members"])
        self.assertIs(during["context"][SYNCING_FIELD], True)
        self.assert_forward_same(during["page"])
        self.assertEqual(carol.get(event)[0], 404)
        status, _ = self.bob.get(room_path(self.room_id, "event", before_ids[0]))
        self.assertEqual(status, 200 if sees_before else 404)
        # backfilled, with partial state: the resync completes them
        self.assertGreater(self.partial_state_events(), 2)
        self.assertEqual(self.admin_messages()[-len(BEFORE) - 1 :], BEFORE + ["after"])
        self.assertTrue(self.partial())  # still held: nothing waited for it
        self.release(rule)
        after = self.history(after_id)
        self.assertEqual(after["messages"], expected)
        self.assertIn(self.bob.user_id, after["members"])
        self.assertNotIn(SYNCING_FIELD, after["context"])
        self.assertEqual(carol.get(event)[0], 404)
        status, _ = self.bob.get(room_path(self.room_id, "event", before_ids[0]))
        self.assertEqual(status, 200 if sees_before else 404)
        self.assertEqual(self.partial_state_events(), 0)


@on_both_databases(ci_database="sqlite")
class HistoryFromABusyResident(HistoryCase):
    def test_the_page_answers_with_what_is_here_and_history_follows(self) -> None:
        """The resident is slow to answer /backfill (held): bob's first page
        answers within the module's budget with the events here and ``end``;
        the next page, which would be empty, waits for the backfill (an empty
        page without ``end`` would tell the client it reached the room's start)
        and, once the resident answers, gives the history from before the
        join. All while the resync is held."""
        self.HISTORY_VISIBILITY = "shared"
        self.setup_room()
        self.say("before 0")
        self.join_held(STATE_PATH)
        after_id = self.say("after")
        event = room_path(self.room_id, "event", after_id)
        wait_until(lambda: self.bob.get(event)[0] == 200, 30, "'after' at hs2")
        backfill = self.peer.add_behaviour(BACKFILL_PATH, "hold")
        path = room_path(self.room_id, "messages")
        started = time.monotonic()
        status, first = self.bob.get(path, params={"dir": "b", "limit": 20})
        took = time.monotonic() - started
        self.assertEqual(status, 200, first)
        self.assertLess(took, 5)  # the budget (0.5 s), then the page itself
        self.assertEqual(bodies(first["chunk"]), ["after"])
        self.assertIn("end", first)
        after_end = f"{path}?dir=b&limit=20&from={quote(first['end'])}"
        self.assert_blocks(after_end)
        self.peer.remove_behaviour(backfill)
        wait_until(
            lambda: (
                "before 0" in bodies(self.bob.get(after_end, timeout=60)[1]["chunk"])
            ),
            60,
            "the history from before the join",
        )
        self.assertTrue(self.partial())  # still held: nothing waited for it
