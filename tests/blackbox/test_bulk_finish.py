"""The bulk finish (``compat/bulk/finish.py``) against Synapse's own: two real
joiners of the same fake room, one with the bulk finish off (``off``: Synapse's
``_update_current_state_txn``) and one with it on (``on``), leave the same rows
in every table the finish writes, and Synapse reads the bulk path's result as
its own."""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from typing import Any
from urllib.parse import quote

from tests.blackbox.resync_case import FAST, STATE_PATHS, wait_until
from tests.fedkit import postgres
from tests.fedkit.homeserver import Homeserver, start_all
from tests.fedkit.matrix_client import Client
from tests.fedkit.rows_finish import (
    LOCAL_JOIN,
    LOCAL_USER,
    Normaliser,
    finish_rows,
    local_join_event,
    user_directory_rows,
)
from tests.fedkit.testcase import (
    FederationTestCase,
    on_both_databases,
    on_room_versions,
)

BULK_LINE = r"Current state of {room}: writing \d+ remote members in bulk"
SHARED_READ_LINE = (
    r"Current-state deltas after stream position \d+ \(\d+ rows\): one read "
    r"for [2-9] of Synapse's handlers"
)
USER_DIRECTORY_LINE = (
    r"User directory: \d+ members joining {room} \((public|private)\) written in bulk"
)


def config(bulk: bool) -> dict[str, Any]:
    resync: dict[str, Any] = FAST["module_config"]["resync"]  # type: ignore[index]
    return {
        "module_config": {
            "resync": {**resync, "bulk_finish": bulk, "bulk_state_deltas": bulk}
        },
        # Background updates back to back: the user directory's and the
        # statistics' initial population must be over before the join, or they
        # would fill those tables from the finished state in place of the
        # delta handlers being compared.
        "extra_config": {
            **FAST["extra_config"],  # type: ignore[dict-item]
            "background_updates": {"sleep_enabled": False},
        },
    }


def no_background_updates(hs: Homeserver) -> bool:
    return not hs.sql("SELECT update_name FROM background_updates")


class _EagerLongPoll(threading.Thread):
    """A client long-polling eager (not lazy-loading) syncs from ``since``
    until the room shows up among its joined rooms."""

    def __init__(self, client: Client, since: str, room_id: str) -> None:
        super().__init__(daemon=True)
        self.client, self.since, self.room_id = client, since, room_id
        self.result: dict[str, Any] = {}
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                resp = self.client.sync(since=self.since, timeout_ms=30000)
                self.since = resp["next_batch"]
                joined = resp.get("rooms", {}).get("join", {})
                if self.room_id in joined:
                    self.result = joined[self.room_id]
                    return
        except Exception as e:  # reported by the test
            self.error = e


class BulkFinishCase(FederationTestCase):
    MEMBERS = 150
    SERVERS = 4
    JOIN_RULE = "public"

    def setup_room(self) -> None:
        self.peer = self.make_fake_peer()
        self.room = self.peer.create_room(
            members=self.MEMBERS,
            servers=self.SERVERS,
            name="Bulk finish room",
            topic="rows",
            alias=True,
            bans=4,
            kicks=4,
            invites=4,
            power_users=2,
            room_version=self.ROOM_VERSION or "10",
            join_rule=self.JOIN_RULE,
        )
        self.room_id: str = self.room["room_id"]
        self.resident: str = self.room["resident"]
        # A pending third-party invite (non-member state with a token key).
        self.peer.send_event(
            self.room_id,
            "m.room.third_party_invite",
            {
                "display_name": "carol@example.org",
                "key_validity_url": "https://identity.example.org/_matrix/identity/v2/pubkey/isvalid",
                "public_key": "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI",
            },
            state_key="token-of-carol",
        )
        # Profiles of every kind the user directory keeps (the finish's
        # deltas then carry these latest joins): an avatar and a name with
        # accents, a name that is not a string, none at all, and a member who
        # left and came back under another name.
        members = sorted(
            e["state_key"]
            for e in self.peer.room_events(self.room_id, limit=100000)["events"]
            if e["type"] == "m.room.member"
            and e.get("content", {}).get("membership") == "join"
            and e["state_key"].startswith("@u")
        )
        profiles: list[tuple[str, dict[str, Any]]] = [
            (
                members[1],
                {
                    "displayname": "Zoë Ünïcode Lovelace",
                    "avatar_url": "mxc://x.org/zoe",
                },
            ),
            (members[2], {"displayname": 7, "avatar_url": ["not", "a", "string"]}),
            (members[3], {}),
            (members[4], {"membership": "leave"}),
            (members[4], {"displayname": "Back Again"}),
        ]
        for user_id, content in profiles:
            self.peer.send_event(
                self.room_id,
                "m.room.member",
                {"membership": "join", **content},
                sender=user_id,
                state_key=user_id,
            )

    def plant_stale_members(self, *servers: Homeserver) -> int:
        """On each joiner (its resync held), a current-state row for every
        banned or kicked remote member naming an event the room never had, as
        a state reset leaves members whose row the finish must replace (the
        delta stream's previous event, the delete). Returns how many."""
        events = self.peer.room_events(self.room_id, limit=100000)["events"]
        gone = sorted(
            {
                e["state_key"]
                for e in events
                if e["type"] == "m.room.member"
                and e.get("content", {}).get("membership") in ("ban", "leave")
                and e["sender"] != e["state_key"]
            }
        )
        self.assertGreater(len(gone), 2)
        for hs in servers:
            for n, user_id in enumerate(gone):
                hs.sql(
                    "INSERT INTO current_state_events (room_id, type, state_key,"
                    " event_id, membership, event_stream_ordering)"
                    " VALUES (?, 'm.room.member', ?, ?, 'join', NULL)",
                    (self.room_id, user_id, f"$stale-{n}"),
                )
        return len(gone)

    def joiners(self, **kw: Any) -> tuple[Homeserver, Homeserver]:
        off = self._new_homeserver("off", True, **config(False), **kw)
        on = self._new_homeserver("on", True, **config(True), **kw)
        start_all([off, on])
        for hs in (off, on):
            wait_until(
                functools.partial(no_background_updates, hs),
                60,
                f"{hs.name}'s background updates",
            )
        self.bob_off = self.register(off, "bob")
        self.bob_on = self.register(on, "bob")
        return off, on

    def wait_complete(
        self, hs: Homeserver, since: int = 0, timeout: float = 180
    ) -> None:
        hs.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} complete",
            timeout=timeout,
            since=since,
        )

    def normalisers(
        self, off: Homeserver, on: Homeserver
    ) -> tuple[Normaliser, Normaliser]:
        bob_off, bob_on = self.bob_off.user_id, self.bob_on.user_id
        join_off = local_join_event(off, self.room_id, bob_off)
        join_on = local_join_event(on, self.room_id, bob_on)
        return (
            Normaliser({bob_off: LOCAL_USER, join_off: LOCAL_JOIN}, {bob_on, join_on}),
            Normaliser({bob_on: LOCAL_USER, join_on: LOCAL_JOIN}, {bob_off, join_off}),
        )

    def same_user_directory(
        self, off: Homeserver, on: Homeserver, norm_off: Normaliser, norm_on: Normaliser
    ) -> dict[str, Any]:
        """Wait until both joiners' user directory rows for the room are the
        same (their handlers run after the finish); return ``on``'s."""
        wait_until(
            lambda: (
                user_directory_rows(off, self.room_id, norm_off)
                == user_directory_rows(on, self.room_id, norm_on)
            ),
            60,
            "the same user directory rows",
        )
        return user_directory_rows(on, self.room_id, norm_on)

    def assert_same_rows(self, off: Homeserver, on: Homeserver) -> None:
        norm_off, norm_on = self.normalisers(off, on)
        rows_off = finish_rows(off, self.room_id, norm_off)
        rows_on = finish_rows(on, self.room_id, norm_on)
        self.assertEqual(rows_off.keys(), rows_on.keys())
        for table in rows_off:
            self.assertEqual(rows_off[table], rows_on[table], table)
        members = rows_on["current_state_events"]
        self.assertGreater(len(members), self.MEMBERS)  # the whole room
        # The user directory is filled after the finish, from its deltas.
        directory = self.same_user_directory(off, on, norm_off, norm_on)
        self.assertGreater(len(directory["users_in_public_rooms"]), self.MEMBERS / 2)
        profiles = {tuple(row[1:]) for row in directory["user_directory"]}
        self.assertIn(("Zoë Ünïcode Lovelace", "mxc://x.org/zoe"), profiles)
        self.assertIn(("Back Again", None), profiles)
        # ... written in bulk on ``on`` only (Synapse's handler on ``off``).
        line = re.compile(USER_DIRECTORY_LINE.format(room=re.escape(self.room_id)))
        # (its line is logged just after the rows it wrote are in)
        on.wait_for_log(line, 10)
        self.assertIsNone(line.search(off.read_log()), "off's user directory in bulk")
        # Only on SQLite (one connection) may ``on``'s bulk write wait for the
        # finish (whether it did depends on timing: tests/unit/compat/
        # test_bulk_deltas.py has the hold itself).
        if self.DATABASE != "sqlite":
            held = re.compile(
                rf"User directory: \d+ members joining {re.escape(self.room_id)} "
                r"waited"
            )
            self.assertIsNone(held.search(on.read_log()), "held on PostgreSQL")


@on_room_versions("10", "11", "12")
class BulkFinishRows(BulkFinishCase):
    def test_same_rows_and_reads_as_synapse_finish(self) -> None:
        """Both joiners' resyncs are held; meanwhile ``on``'s bob starts an
        eager long-polling sync (partial rooms are left out of those). Once
        released, both complete, ``on`` through the bulk path and ``off``
        through Synapse's; the long poll is woken with the room and its full
        member list; every table the finish writes holds the same rows on both
        (current state, its delta stream by transaction, local membership,
        sliding-sync tables, device-list subscriptions, room stats state, the
        cache-invalidation stream on PostgreSQL), and so do the user directory
        tables once filled; /members, /joined_members, /state, a user directory
        search and /state_ids served as a resident answer the same."""
        self.setup_room()
        off, on = self.joiners()
        rule = self.peer.add_behaviour(STATE_PATHS, "hold")
        since_off, since_on = off.log_offset(), on.log_offset()
        self.bob_off.join(self.room_id, via=[self.resident])
        self.bob_on.join(self.room_id, via=[self.resident])
        stale = self.plant_stale_members(off, on)
        eager = self.bob_on.sync()
        self.assertNotIn(self.room_id, eager.get("rooms", {}).get("join", {}))
        poll = _EagerLongPoll(
            Client(self.bob_on.base_url, self.bob_on.user_id, self.bob_on.access_token),
            eager["next_batch"],
            self.room_id,
        )
        poll.start()
        time.sleep(1)  # let it start waiting
        self.peer.remove_behaviour(rule)
        self.wait_complete(off, since_off)
        self.wait_complete(on, since_on)
        bulk = re.compile(BULK_LINE.format(room=re.escape(self.room_id)))
        self.assertTrue(bulk.search(on.read_log()), "on did not take the bulk path")
        self.assertIsNone(bulk.search(off.read_log()), "off took the bulk path")
        on.wait_for_log(rf"bulk rows written in .* \({stale} members replaced\)", 5)
        # Synapse's delta handlers read the finish's delta (the whole room at
        # one stream position) once between them (compat/bulk/delta_reads.py),
        # and fill the same tables (compared below).
        on.wait_for_log(SHARED_READ_LINE, 10)

        self.assert_same_rows(off, on)

        norm_off, norm_on = self.normalisers(off, on)
        # /joined_members, /members, /state
        joined_off = norm_off.rows(
            (u,) for u in self.bob_off.joined_members(self.room_id)
        )
        joined_on = norm_on.rows((u,) for u in self.bob_on.joined_members(self.room_id))
        self.assertEqual(joined_off, joined_on)
        self.assertGreater(len(joined_on), self.MEMBERS / 2)

        def events(chunk: list[dict[str, Any]], norm: Normaliser) -> Any:
            return norm.rows(
                (e["type"], e["state_key"], e["event_id"], e["sender"]) for e in chunk
            )

        self.assertEqual(
            events(self.bob_off.members(self.room_id), norm_off),
            events(self.bob_on.members(self.room_id), norm_on),
        )
        state_on = events(self.bob_on.room_state(self.room_id), norm_on)
        self.assertEqual(
            events(self.bob_off.room_state(self.room_id), norm_off), state_on
        )
        # The long poll was woken by the completion, with the room's members.
        poll.join(timeout=120)
        self.assertIsNone(poll.error)
        synced = [
            e
            for e in poll.result.get("state", {}).get("events", [])
            + poll.result.get("timeline", {}).get("events", [])
            if e["type"] == "m.room.member"
        ]
        self.assertEqual(
            {e["state_key"] for e in synced} - {self.bob_off.user_id},
            {k for (t, k, *_rest) in state_on if t == "m.room.member"} - {LOCAL_USER}
            | {self.bob_on.user_id},
        )
        # The user directory: a remote member found by name.
        member = next(
            k
            for (t, k, *_rest) in state_on
            if t == "m.room.member" and (k,) in joined_on and k != LOCAL_USER
        )
        localpart = member[1:].split(":", 1)[0]
        for client, norm in ((self.bob_off, norm_off), (self.bob_on, norm_on)):
            status, body = client.post(
                "/_matrix/client/v3/user_directory/search",
                {"search_term": localpart, "limit": 50},
            )
            self.assertEqual(status, 200, body)
            self.assertIn(
                (member,), norm.rows((r["user_id"],) for r in body["results"])
            )
        # /state_ids served as a resident, at each joiner's own join.
        answers = []
        for hs, norm, bob in (
            (off, norm_off, self.bob_off.user_id),
            (on, norm_on, self.bob_on.user_id),
        ):
            join = local_join_event(hs, self.room_id, bob)
            answer = self.peer.federation_request(
                self.resident,
                hs.server_name,
                "GET",
                f"/_matrix/federation/v1/state_ids/{quote(self.room_id, safe='')}"
                f"?event_id={quote(join, safe='')}",
            )
            self.assertEqual(answer["status"], 200, answer)
            answers.append(norm.rows((e,) for e in answer["body"]["pdu_ids"]))
        self.assertEqual(answers[0], answers[1])
        self.assertGreater(len(answers[1]), self.MEMBERS)


@on_both_databases
class BulkDeltasPrivateRoom(BulkFinishCase):
    JOIN_RULE = "invite"

    def test_private_room_user_directory_as_synapse(self) -> None:
        """An invite-only room (both joiners' users invited by the resident):
        at the finish, Synapse's user directory marks each member's profile
        stale, schedules its refresh and records that the local user shares a
        private room with them, walking the whole member list per member on
        ``off``, once per run on ``on``. The same rows."""
        self.setup_room()
        off, on = self.joiners()
        for bob in (self.bob_off, self.bob_on):
            self.peer.send_event(
                self.room_id,
                "m.room.member",
                {"membership": "invite"},
                state_key=bob.user_id,
                destinations=[],
            )
        since_off, since_on = off.log_offset(), on.log_offset()
        self.bob_off.join(self.room_id, via=[self.resident])
        self.bob_on.join(self.room_id, via=[self.resident])
        self.wait_complete(off, since_off)
        self.wait_complete(on, since_on)
        rows = self.same_user_directory(off, on, *self.normalisers(off, on))
        self.assertEqual(rows["users_in_public_rooms"], {})
        self.assertGreater(len(rows["users_who_share_private_rooms"]), self.MEMBERS / 2)
        self.assertGreater(
            len(rows["user_directory_stale_remote_users"]), self.MEMBERS / 2
        )
        line = re.compile(
            USER_DIRECTORY_LINE.replace("(public|private)", "private").format(
                room=re.escape(self.room_id)
            )
        )
        on.wait_for_log(line, 10)
        self.assertIsNone(line.search(off.read_log()), "off's user directory in bulk")
        # Freed memory is given back once the resync is complete.
        on.wait_for_log(
            rf"Resync of {re.escape(self.room_id)}: returned \d+ MiB of freed memory"
            r" to the system at completion \(RSS \d+ -> \d+ MiB\)",
            10,
        )


class BulkFinishCrash(BulkFinishCase):
    """PostgreSQL only: a lock taken from outside holds the bulk transaction
    at its first write, so the kill lands inside it (SQLite's one writer would
    hold every other write of the server too)."""

    DATABASE = "postgres"

    def test_killed_inside_the_bulk_finish_resumes_with_the_same_rows(self) -> None:
        """``on`` is SIGKILLed while its bulk transaction waits for a lock on
        ``current_state_delta_stream``: nothing of it is committed (the room
        is still partial, its current state still the partial one); restarted,
        it resumes the resync, finishes in bulk again, and ends with the same
        rows as ``off``'s Synapse finish."""
        if "postgres" not in os.environ.get("SPS_TEST_DATABASES", "postgres"):
            self.skipTest("PostgreSQL not selected (SPS_TEST_DATABASES)")
        self.setup_room()
        off, on = self.joiners()
        rule = self.peer.add_behaviour(STATE_PATHS, "hold")
        since_off, since_on = off.log_offset(), on.log_offset()
        self.bob_off.join(self.room_id, via=[self.resident])
        self.bob_on.join(self.room_id, via=[self.resident])
        partial_rows = on.sql(
            "SELECT COUNT(*) FROM current_state_events WHERE room_id = ?",
            (self.room_id,),
        )[0][0]
        assert on.database_name is not None
        lock = postgres.pg_connect(on.database_name)
        lock.autocommit = False
        try:
            with lock.cursor() as cur:
                cur.execute("LOCK TABLE current_state_delta_stream IN EXCLUSIVE MODE")
            self.peer.remove_behaviour(rule)
            self.wait_complete(off, since_off)
            on.wait_for_log(
                BULK_LINE.format(room=re.escape(self.room_id)), 120, since_on
            )
            wait_until(
                lambda: on.sql(
                    "SELECT COUNT(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )[0][0],
                60,
                "the bulk transaction waiting for the lock",
            )
            on.kill()
        finally:
            lock.rollback()
            lock.close()
        self.assertEqual(
            on.sql(
                "SELECT COUNT(*) FROM partial_state_rooms WHERE room_id = ?",
                (self.room_id,),
            ),
            [(1,)],
        )
        self.assertEqual(
            on.sql(
                "SELECT COUNT(*) FROM current_state_events WHERE room_id = ?",
                (self.room_id,),
            )[0][0],
            partial_rows,
        )
        since = on.log_offset()
        on.start()
        self.wait_complete(on, since)
        on.wait_for_log(BULK_LINE.format(room=re.escape(self.room_id)), 5, since)
        self.assert_same_rows(off, on)
