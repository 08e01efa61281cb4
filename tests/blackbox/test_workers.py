"""The module in a Synapse worker deployment: real workers, real nginx, real Redis.

:class:`~tests.fedkit.workers.WorkerHomeserver` runs a main process, two
federation workers, a sync worker, a client reader, a federation sender and a
background worker on PostgreSQL, behind nginx routed as Synapse's worker
documentation says. PostgreSQL only; skipped when PostgreSQL, Redis or nginx is
missing.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, cast
from urllib.parse import quote

from synapse_partial_state.wire import SIGNING_SERVERS_FIELD, SYNCING_FIELD
from tests.blackbox.endpoints import ADMIN, full_status
from tests.blackbox.resync_case import (
    DOWN_SERVERS,
    FAST,
    STATE_PATHS,
    resident_state,
    wait_until,
)
from tests.blackbox.test_device_lists import DeviceListCase
from tests.fedkit.matrix_client import Client
from tests.fedkit.testcase import FederationTestCase
from tests.fedkit.workers import WorkerHomeserver, unavailable_reason

#: Processes serving the client API (each checked on its own listener).
CLIENT_PROCESSES = (
    "main",
    "federation1",
    "federation2",
    "synchrotron",
    "client_reader",
)


def progress_path(room_id: str) -> str:
    """The module's MSC2775 progress endpoint for ``room_id``."""
    return (
        "/_matrix/client/unstable/org.matrix.msc2775/rooms/"
        f"{quote(room_id, safe='')}/partial_state"
    )


class WorkerCase(FederationTestCase):
    DATABASE = "postgres"

    def setUp(self) -> None:
        super().setUp()
        reason = unavailable_reason()
        if reason is not None:
            self.skipTest(reason)

    def worker_joiner(self, partial_members: bool = False) -> WorkerHomeserver:
        """``hs2``: a joiner on workers with the fast back-offs (and, with
        ``partial_members``, ``clients.members_during_resync: partial``)."""
        module_config = dict(cast(dict[str, Any], FAST["module_config"]))
        if partial_members:
            module_config["clients"] = {"members_during_resync": "partial"}
        return self.make_worker_homeserver(
            "hs2", module_config=module_config, extra_config=FAST["extra_config"]
        )

    def assert_complete_everywhere(
        self, hs: WorkerHomeserver, user: Client, path: str, expected: int
    ) -> None:
        """Every process serving clients answers ``path`` (a ``joined_members``)
        without the syncing marker (the room's partial flag clear there, as
        replicated), with ``expected`` members."""
        for name in CLIENT_PROCESSES:
            direct = self.client_at(hs, name, user)

            def complete(direct: Client = direct) -> Any:
                status, body = direct.get(path, timeout=60)
                self.assertEqual(status, 200, body)
                return SYNCING_FIELD not in body and body

            body = wait_until(complete, 30, f"{name}: the room not partial")
            self.assertEqual(len(body["joined"]), expected, name)

    def client_at(self, hs: WorkerHomeserver, process: str, client: Client) -> Client:
        """``client``'s user talking to one process directly (no nginx)."""
        url = hs.main_url if process == "main" else hs.workers[process].url
        direct = Client(url, client.user_id, client.access_token)
        self.addCleanup(direct.close)
        return direct

    def assert_routed(
        self, hs: WorkerHomeserver, path_regex: str, processes: set[str]
    ) -> None:
        """nginx sent the requests matching ``path_regex`` (at least one) only to
        some of ``processes`` (nginx logs a request once it has answered it:
        wait a little for the line)."""

        def routed() -> bool:
            got = hs.upstreams(path_regex)
            return bool(got) and got <= processes

        try:
            wait_until(routed, 10, f"{path_regex} routed to {processes}")
        except TimeoutError:
            self.fail(
                f"{path_regex}: routed to {hs.upstreams(path_regex)},"
                f" not within {processes}"
            )


class ModuleJoinerOnWorkers(WorkerCase):
    MEMBERS = 120
    SERVERS = 4

    def test_partial_join_and_resync_seen_by_every_process(self) -> None:
        peer = self.make_fake_peer()
        room = peer.create_room(
            members=self.MEMBERS, servers=self.SERVERS, name="Worker room"
        )
        room_id, resident = room["room_id"], room["resident"]
        hs2 = self.worker_joiner(partial_members=True)
        bob = self.register(hs2, "bob")
        # Every server fails state requests until told otherwise: the room
        # stays partial while the workers are asked.
        hold = peer.add_behaviour(STATE_PATHS, "error", status=502)
        since = hs2.log_offset()
        bob.join(room_id, via=[resident])
        # The join went through the client worker; the resync runs on main.
        self.assert_routed(hs2, "/_matrix/client/v3/join/", {"client_reader"})
        hs2.wait_for_log(rf"Starting resync of {re.escape(room_id)}", since=since)
        path = f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/joined_members"
        status, body = bob.get(path)
        self.assertEqual(status, 200, body)
        self.assertIs(body.get(SYNCING_FIELD), True, "the client reader: not partial")
        # Every process serving clients, asked directly, has the room partial.
        for name in CLIENT_PROCESSES:
            status, body = self.client_at(hs2, name, bob).get(path)
            self.assertEqual(status, 200, body)
            self.assertIs(body.get(SYNCING_FIELD), True, f"{name}: not partial")
        # /messages answers during the resync on the client worker (no wait
        # for the full state), with the join at least.
        started = time.monotonic()
        status, page = bob.get(
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages",
            params={"dir": "b", "limit": 20},
        )
        self.assertEqual(status, 200, page)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn(
            bob.user_id,
            [e.get("state_key") for e in page["chunk"] if e["type"] == "m.room.member"],
        )
        self.assert_routed(
            hs2, "/_matrix/client/v3/rooms/.*/messages", {"client_reader"}
        )
        # The module's progress endpoint, on the client worker, reads the job.
        status, progress = bob.get(progress_path(room_id))
        self.assertEqual(status, 200, progress)
        self.assertIs(progress["syncing"], True, progress)
        peer.remove_behaviour(hold)
        hs2.wait_for_log(
            rf"Resync of {re.escape(room_id)} complete", timeout=180, since=since
        )
        for name in hs2.workers:
            self.assertNotIn(
                f"Resync of {room_id} complete",
                hs2.worker_log(name),
                f"{name} ran the resync",
            )

        expected = room["member_count"] + 1
        # Through nginx (the client reader).
        self.assertEqual(len(bob.joined_members(room_id, timeout=60)), expected)
        # Every process serving clients sees the room's partial flag clear:
        # with members_during_resync=partial, a process that still thought it
        # partial would answer from the partial state, marked syncing.
        self.assert_complete_everywhere(hs2, bob, path, expected)

        status, progress = bob.get(progress_path(room_id))
        self.assertEqual((status, progress["syncing"]), (200, False), progress)
        self.assert_routed(
            hs2, "/_matrix/client/unstable/org.matrix.msc2775/", {"client_reader"}
        )
        # The admin API is the main process's (nginx's default route): the job
        # is done; a worker asked directly has no engine and says so.
        admin = self.register(hs2, "admin", admin=True)
        status, job = admin.get(f"{ADMIN}/{quote(room_id, safe='')}")
        self.assertEqual((status, job.get("phase")), (200, "done"), job)
        self.assert_routed(hs2, "/_synapse/admin/v1/partial_state/", {"main"})
        status, body = self.client_at(hs2, "client_reader", admin).get(
            f"{ADMIN}/{quote(room_id, safe='')}"
        )
        self.assertEqual(status, 404, body)
        # The status endpoint names the process answering.
        self.assertIsNone(full_status(admin)["worker"])
        direct = self.client_at(hs2, "synchrotron", admin)
        self.assertEqual(full_status(direct)["worker"], "synchrotron")

        # /sync through nginx is the sync worker's, and shows the room, complete.
        sync = bob.sync(filter=Client.lazy_loading_filter(room_id))
        self.assertIn(room_id, sync["rooms"]["join"])
        self.assertIsNot(sync["rooms"]["join"][room_id].get(SYNCING_FIELD), True)
        self.assert_routed(hs2, "/_matrix/client/v3/sync", {"synchrotron"})
        # The room's state on hs2 is exactly the resident's.
        got = {
            (e["type"], e["state_key"]): e["event_id"] for e in bob.room_state(room_id)
        }
        expected_state = resident_state(
            peer.room_events(room_id, limit=100000)["events"]
        )
        expected_state[("m.room.member", bob.user_id)] = got[
            ("m.room.member", bob.user_id)
        ]
        self.assertEqual(got, expected_state)

        # The federation sender sends bob's message to every server of the
        # room, not only to the ones it knew at the join.
        peer.clear_transactions()
        bob.send_message(room_id, "after the resync")
        servers = {m.split(":", 1)[1] for m in bob.joined_members(room_id)}
        servers.discard(hs2.server_name)

        def reached() -> set[str]:
            got_by = {
                txn["destination"]
                for txn in peer.transactions(origin=hs2.server_name)
                for pdu in txn["body"].get("pdus", [])
                if pdu.get("content", {}).get("body") == "after the resync"
            }
            return got_by if got_by >= servers else set()

        wait_until(reached, 60, "the message at every server of the room")
        # ... from the federation sender, which is the only process sending.
        self.assertTrue(servers)
        # (The sender logs the 200 once it has read the answer, which can be
        # after the peer recorded the transaction: wait for the line.)
        for server in servers:
            hs2.wait_for_worker_log(
                hs2.SENDER,
                rf"TX \[{re.escape(server)}\] \{{\d+\}} got 200 response",
                timeout=30,
            )
        self.assertNotIn("Sending transaction", hs2.read_log())


class StockJoinerModuleResidentOnWorkers(WorkerCase):
    LOCAL_MEMBERS = 20

    def test_state_served_by_a_federation_worker(self) -> None:
        hs1 = self.make_worker_homeserver("hs1")
        hs2 = self.make_homeserver("hs2", with_module=False, db="postgres")
        peer = self.make_fake_peer()
        alice = self.register(hs1, "alice")
        room_id = alice.create_room(preset="public_chat")
        for i in range(self.LOCAL_MEMBERS):
            self.register(hs1, f"member{i}").join(room_id)
        # Members of two more servers, joined with the full state.
        for _ in range(2):
            result = peer.join(room_id, hs1.server_name, omit_members=False)
            self.assertEqual(result["send_join"]["status"], 200, result)
            # The signing-servers hint, from a federation worker's /make_join.
            self.assertIn(SIGNING_SERVERS_FIELD, result["make_join"]["body"])
        self.assert_routed(
            hs1, "/_matrix/federation/v1/make_join/", set(hs1.FEDERATION_WORKERS)
        )
        # The local members' joins reached main (and the federation readers).
        expected = set(alice.joined_members(room_id))
        self.assertEqual(len(expected), self.LOCAL_MEMBERS + 3)

        bob = self.register(hs2, "bob")
        bob.join(room_id, via=[hs1.server_name])
        # The join was partial (the module's essentials, from a federation
        # worker), and stock Synapse resyncs.
        hs2.wait_for_log(rf"Syncing state for room {re.escape(room_id)}", timeout=60)
        self.assert_routed(
            hs1,
            "/_matrix/federation/v2/send_join/.*omit_members=true",
            set(hs1.FEDERATION_WORKERS),
        )
        # Stock /joined_members waits for the full state: the resync's end.
        got = set(bob.joined_members(room_id, timeout=180))
        self.assertEqual(got, expected | {bob.user_id})
        wait_until(
            lambda: (
                not hs2.sql(
                    "SELECT 1 FROM partial_state_rooms WHERE room_id = ?", (room_id,)
                )
            ),
            60,
            "hs2's partial flag cleared",
        )
        self.assertEqual(set(alice.joined_members(room_id)), got)

        # hs2's state requests were answered by a federation worker, never main
        # (nginx's access log names the process that answered each one).
        quoted = re.escape(quote(room_id, safe=""))
        via = re.findall(r"Syncing state for room .* via \S+", hs2.read_log())
        for endpoint in ("state_ids", "state"):
            path = rf"/_matrix/federation/v1/{endpoint}/{quoted}"
            if not hs1.upstreams(path):
                self.fail(f"hs1 never asked for /{endpoint} (hs2 resynced: {via})")
            self.assert_routed(hs1, path, set(hs1.FEDERATION_WORKERS))


class WorkerRestartedMidResync(WorkerCase):
    def test_restarted_workers_see_the_room_partial_then_complete(self) -> None:
        peer = self.make_fake_peer()
        room = peer.create_room(members=60, servers=DOWN_SERVERS, name="Restart room")
        room_id, resident = room["room_id"], room["resident"]
        hs2 = self.worker_joiner(partial_members=True)
        bob = self.register(hs2, "bob")
        admin = self.register(hs2, "admin", admin=True)
        # Every server fails state requests: the resync backs off and retries.
        rule = peer.add_behaviour(STATE_PATHS, "error", status=502)
        since = hs2.log_offset()
        bob.join(room_id, via=[resident])
        hs2.wait_for_log(r"all \d+ server\(s\) failed", timeout=60, since=since)

        path = f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/joined_members"
        restarted = (hs2.CLIENT_WORKER, hs2.SYNC_WORKER, "federation1")
        old_pids = {name: hs2.workers[name].pid for name in restarted}
        for name in restarted:
            hs2.restart_worker(name)
            self.assertNotEqual(hs2.workers[name].pid, old_pids[name])
        # Restarted mid-resync, they read the room as partial.
        for name in restarted:
            status, body = self.client_at(hs2, name, bob).get(path)
            self.assertEqual(status, 200, body)
            self.assertIs(body.get(SYNCING_FIELD), True, name)
        status, progress = bob.get(progress_path(room_id))
        self.assertEqual((status, progress["syncing"]), (200, True), progress)
        status, job = admin.get(f"{ADMIN}/{quote(room_id, safe='')}")
        self.assertEqual(status, 200, job)
        self.assertNotEqual(job["phase"], "done", job)

        peer.remove_behaviour(rule)
        hs2.wait_for_log(
            rf"Resync of {re.escape(room_id)} complete", timeout=180, since=since
        )
        expected = room["member_count"] + 1
        self.assert_complete_everywhere(hs2, bob, path, expected)
        sync = bob.sync(filter=Client.lazy_loading_filter(room_id))
        self.assertIn(room_id, sync["rooms"]["join"])
        self.assertIsNot(sync["rooms"]["join"][room_id].get(SYNCING_FIELD), True)


class RedactionForgottenByEveryFederationWorker(WorkerCase):
    def test_state_cache_of_each_federation_worker_drops_a_redacted_event(
        self,
    ) -> None:
        hs1 = self.make_worker_homeserver("hs1")
        peer = self.make_fake_peer()
        alice = self.register(hs1, "alice")
        room_id = alice.create_room(
            preset="public_chat", name="Cache room", topic="Before the redaction"
        )
        for i in range(3):
            self.register(hs1, f"member{i}").join(room_id)
        joined = peer.join(room_id, hs1.server_name, omit_members=False)
        self.assertEqual(joined["send_join"]["status"], 200, joined)
        asker = joined["server"]
        last_id = alice.send_message(room_id, "the state is asked at this event")
        topic_id = alice._call(
            "GET",
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/m.room.topic/",
            params={"format": "event"},
        )["event_id"]
        path = (
            f"/_matrix/federation/v1/state/{quote(room_id, safe='')}"
            f"?event_id={quote(last_id, safe='')}"
        )

        def topic_served() -> list[dict[str, Any]]:
            """The topic event as each of two /state answers has it (nginx
            sends consecutive requests to the two federation workers in turn)."""
            topics = []
            for _ in range(2):
                result = peer.federation_request(asker, hs1.server_name, "GET", path)
                self.assertEqual(result["status"], 200, result)
                (topic,) = [
                    p
                    for p in result["body"]["pdus"]
                    if p["type"] == "m.room.topic" and p["state_key"] == ""
                ]
                topics.append(topic)
            return topics

        # Both workers cache the state, topic included.
        offsets = {n: hs1.worker_log_offset(n) for n in hs1.FEDERATION_WORKERS}
        for topic in topic_served() + topic_served():
            self.assertEqual(topic["content"]["topic"], "Before the redaction")
        for name in hs1.FEDERATION_WORKERS:
            # (Synapse flushes its log a fraction of a second later.)
            hs1.wait_for_worker_log(
                name, "state cache: /state full", timeout=10, since=offsets[name]
            )

        status, body = alice.put(
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/redact/"
            f"{quote(topic_id, safe='')}/r1",
            {"reason": "test"},
        )
        self.assertEqual(status, 200, body)
        # Replication reaches both workers: then every answer has it pruned.
        wait_until(
            lambda: all(t["content"] == {} for t in topic_served()),
            30,
            "both federation workers serving the topic redacted",
        )
        offsets = {n: hs1.worker_log_offset(n) for n in hs1.FEDERATION_WORKERS}
        for _ in range(3):
            for topic in topic_served():
                self.assertEqual(topic["content"], {})
        for name in hs1.FEDERATION_WORKERS:
            hs1.wait_for_worker_log(
                name, "state cache: /state full", timeout=10, since=offsets[name]
            )


class LeaveMidResyncOnWorkers(WorkerCase):
    def test_leave_through_a_worker_aborts_and_reaches_the_room(self) -> None:
        """The last local user leaves through the client worker mid-resync: the
        engine (main) sees it through the events stream, waits for the
        federation sender *worker* to send the leave, purges the room; a rejoin
        then completes."""
        peer = self.make_fake_peer()
        room = peer.create_room(members=40, servers=DOWN_SERVERS, name="Leave room")
        room_id, resident = room["room_id"], room["resident"]
        hs2 = self.worker_joiner()
        bob = self.register(hs2, "bob")
        admin = self.register(hs2, "admin", admin=True)
        rule = peer.add_behaviour(STATE_PATHS, "error", status=502)
        since = hs2.log_offset()
        bob.join(room_id, via=[resident])
        hs2.wait_for_log(r"all \d+ server\(s\) failed", timeout=60, since=since)
        wait_until(
            lambda: peer.room(room_id)["real_servers_joined"], 30, "bob's join seen"
        )

        bob.leave(room_id)
        self.assert_routed(hs2, "/_matrix/client/v3/rooms/.*/leave", {"client_reader"})

        def aborted() -> Any:
            status, job = admin.get(f"{ADMIN}/{quote(room_id, safe='')}")
            self.assertEqual(status, 200, job)
            return job["phase"] == "aborted" and job

        job = wait_until(aborted, 60, "the job aborted")
        self.assertIn("no local user", job["last_error"])
        hs2.wait_for_log(r"Aborting resync of", timeout=10, since=since)
        self.assertNotIn(
            "has not sent the last local membership", hs2.read_log()[since:]
        )
        # The leave reached the room's servers from the federation sender.
        wait_until(
            lambda: not peer.room(room_id)["real_servers_joined"],
            30,
            "the room's servers to see bob's leave",
        )
        self.assertNotIn(room_id, bob.joined_rooms())

        peer.remove_behaviour(rule)
        since = hs2.log_offset()
        bob.join(room_id, via=[resident])
        hs2.wait_for_log(
            rf"Resync of {re.escape(room_id)} complete", timeout=180, since=since
        )
        self.assertEqual(
            len(bob.joined_members(room_id, timeout=60)), room["member_count"] + 1
        )


class SyncingSignalOnTheSyncWorker(WorkerCase):
    def test_syncing_true_while_held_then_false_and_a_long_poll_is_woken(
        self,
    ) -> None:
        """On the sync worker: lazy-loading syncs show the room syncing while
        the resync (on main) is held; a long-polling sync is woken by the
        completion, which reaches the sync worker through replication, with
        ``false``; the next incremental sync has no field."""
        peer = self.make_fake_peer()
        room = peer.create_room(members=60, servers=3, name="Sync room")
        room_id, resident = room["room_id"], room["resident"]
        hs2 = self.worker_joiner()
        bob = self.register(hs2, "bob")
        lazy = Client.lazy_loading_filter(room_id)
        rule = peer.add_behaviour(STATE_PATHS, "error", status=502)
        since = hs2.log_offset()
        bob.join(room_id, via=[resident])
        hs2.wait_for_log(rf"Starting resync of {re.escape(room_id)}", since=since)

        first = bob.sync(filter=lazy)
        self.assertIs(first["rooms"]["join"][room_id][SYNCING_FIELD], True)
        bob.send_message(room_id, "during")
        second = wait_until(
            lambda: (
                (r := bob.sync(since=first["next_batch"], filter=lazy))["rooms"]
                .get("join", {})
                .get(room_id)
                and r
            ),
            30,
            "the message in an incremental sync",
        )
        self.assertIs(second["rooms"]["join"][room_id][SYNCING_FIELD], True)

        # A long poll on the sync worker, then the resync is let through.
        poller = Client(bob.base_url, bob.user_id, bob.access_token)
        self.addCleanup(poller.close)
        result: dict[str, Any] = {}

        def poll() -> None:
            try:
                result["body"] = poller.sync(
                    since=second["next_batch"], filter=lazy, timeout_ms=60000
                )
                result["at"] = time.monotonic()
            except Exception as e:  # reported by the test
                result["error"] = e

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        time.sleep(1)  # let it wait
        peer.remove_behaviour(rule)
        released = time.monotonic()
        hs2.wait_for_log(
            rf"Resync of {re.escape(room_id)} complete", timeout=180, since=since
        )
        thread.join(timeout=90)
        self.assertNotIn("error", result)
        body = result["body"]
        self.assertIs(body["rooms"]["join"][room_id][SYNCING_FIELD], False)
        # woken by the completion, not by its 60 s timeout
        self.assertLess(result["at"] - released, 30)
        self.assert_routed(hs2, "/_matrix/client/v3/sync", {"synchrotron"})

        bob.send_message(room_id, "after")

        def later_sync() -> Any:
            r = bob.sync(since=body["next_batch"], filter=lazy)
            return r["rooms"].get("join", {}).get(room_id) and r

        later = wait_until(later_sync, 30, "the message after")
        self.assertNotIn(SYNCING_FIELD, later["rooms"]["join"][room_id])


class DeviceListsOnWorkers(WorkerCase, DeviceListCase):
    """The device-list replay with ``hs2`` on workers: bob's device change goes
    to main (the device-list writer, where the module queues it for the servers
    the partial state does not name), and the federation sender *worker* sends
    it, then the replay at completion."""

    def make_homeserver(  # type: ignore[override]
        self, name: str = "hs", with_module: bool = True, start: bool = True, **kw: Any
    ) -> WorkerHomeserver:
        return self.make_worker_homeserver(name, with_module, start, **kw)

    def test_replay_reaches_missed_servers_once(self) -> None:
        self.setup_room(hidden=("c", "d"))
        hs2 = cast(WorkerHomeserver, self.hs2)
        r, a, b, c, d = (self.resident, *(self.server[k] for k in "abcd"))
        rule = self.join_and_hold()

        self.rename_device("during the resync")
        self.assert_routed(hs2, "/_matrix/client/v3/devices/", {"main"})
        self.wait_updates([r, a, b], 1)
        self.assert_updates({r: 1, a: 1, b: 1, c: 0, d: 0})
        self.assertEqual(self.queued(), 1)

        self.release(rule)
        self.wait_updates([c, d], 1)
        self.assert_updates({r: 1, a: 1, b: 1, c: 1, d: 1})
        self.assertEqual(self.queued(), 0)

        self.rename_device("after the resync")
        self.wait_updates([r, a, b, c, d], 2)
        self.assert_updates({r: 2, a: 2, b: 2, c: 2, d: 2})
        # Only the federation sender sends.
        self.assertNotIn("Sending transaction", hs2.read_log())
