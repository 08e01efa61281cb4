"""Proves the federation kit: real stock Synapses federating over loopback TLS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil

from tests.fedkit.homeserver import HomeserverStartError
from tests.fedkit.postgres import drop_postgres_database, postgres_database_exists
from tests.fedkit.process import REPO_ROOT
from tests.fedkit.testcase import FederationTestCase, on_both_databases


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


@on_both_databases
class KitTests(FederationTestCase):
    def test_stock_servers_federate(self) -> None:
        """A remote join (stock partial join) and messages both ways."""
        hs1, hs2 = self.make_homeservers(["hs1", "hs2"], with_module=False)
        alice = self.register(hs1, "alice")
        bob = self.register(hs2, "bob")

        room_id = alice.create_room(preset="public_chat", name="kit")
        joined = bob.join(room_id, via=[hs1.server_name])
        self.assertEqual(joined, room_id)

        alice.send_message(room_id, "hello from hs1")
        bob.send_message(room_id, "hello from hs2")
        seen_by_bob = bob.wait_for_message(room_id, "hello from hs1", timeout=30)
        self.assertEqual(seen_by_bob["sender"], alice.user_id)
        seen_by_alice = alice.wait_for_message(room_id, "hello from hs2", timeout=30)
        self.assertEqual(seen_by_alice["sender"], bob.user_id)

        # Blocks until hs2's partial state is resolved.
        self.assertEqual(set(bob.joined_members(room_id)), {alice.user_id, bob.user_id})
        self.assertEqual(
            set(alice.joined_members(room_id)), {alice.user_id, bob.user_id}
        )
        # Stock Synapse did a partial join and its resync.
        hs2.wait_for_log(
            r"Syncing state for room .* via " + hs1.server_name.replace(".", r"\."), 10
        )

    def test_bad_config_fails_start_with_synapse_error(self) -> None:
        hs = self.make_homeserver(
            "bad",
            with_module=False,
            start=False,
            extra_config={"default_room_version": "no-such-version"},
        )
        with self.assertRaises(HomeserverStartError) as cm:
            hs.start(timeout=60)
        self.assertIn(
            "Unknown default_room_version: no-such-version", str(cm.exception)
        )
        self.assertFalse(hs.is_running())

    def test_stop_kill_restart_and_cleanup(self) -> None:
        hs = self.make_homeserver("hs", with_module=False)
        alice = self.register(hs, "alice")
        room_id = alice.create_room(preset="private_chat")
        self.assertGreater(hs.rss_peak_bytes(), 10 * 2**20)
        self.assertGreater(hs.cpu_seconds(), 0)

        # A crash, then a restart on the same ports, database and files.
        pid = hs.pid
        assert pid is not None
        hs.kill()
        self.assertTrue(_gone(pid))
        offset = hs.log_offset()
        hs.start()
        self.assertNotEqual(hs.pid, pid)
        self.assertIn(room_id, alice.joined_rooms())
        hs.wait_for_log(r"\*\*\*\*\* STARTING SERVER \*\*\*\*\*", 5, since=offset)

        pid = hs.pid
        assert pid is not None
        hs.stop()
        self.assertTrue(_gone(pid))
        hs.stop()  # idempotent
        self.assertFalse(hs.is_running())

        hs.cleanup()
        if self.DATABASE == "postgres":
            assert hs.database_name is not None
            self.assertFalse(postgres_database_exists(hs.database_name))

    def _stderr_file(self, how: str) -> Any:
        f = open(os.path.join(self.workdir, f"{how}.stderr"), "w")  # noqa: SIM115
        self.addCleanup(f.close)
        return f

    def test_no_server_outlives_a_killed_test_process(self) -> None:
        """SIGTERM to the test process: handler stops servers and drops databases.

        SIGKILL: the servers die with it (PDEATHSIG)."""
        script = textwrap.dedent(
            """
            import json, sys, time
            from tests.fedkit.certs import KitCA
            from tests.fedkit.homeserver import Homeserver
            hs = Homeserver(sys.argv[1], "orphan", KitCA(sys.argv[2]), db=sys.argv[3], with_module=False)
            hs.start()
            print(json.dumps({"pid": hs.pid, "db": hs.database_name}), flush=True)
            time.sleep(600)
            """
        )
        procs = {}
        for how in ("term", "kill"):
            procs[how] = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    script,
                    os.path.join(self.workdir, how),
                    self.ca.directory,
                    self.DATABASE,
                ],
                cwd=REPO_ROOT,
                env={**os.environ, "SPS_PG_POOL_SIZE": "0"},
                stdout=subprocess.PIPE,
                # The kit reports slow clean-up steps there (see below).
                stderr=self._stderr_file(how),
                text=True,
            )
            self.addCleanup(procs[how].kill)
        info = {}
        for how, proc in procs.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            self.assertTrue(
                line, f"{how}: child test process failed to start a homeserver"
            )
            info[how] = json.loads(line)

        procs["term"].send_signal(signal.SIGTERM)
        procs["kill"].send_signal(signal.SIGKILL)
        for how, proc in procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with open(os.path.join(self.workdir, f"{how}.stderr")) as f:
                    self.fail(f"{how}: the test process took over 30 s:\n{f.read()}")
        for how in ("term", "kill"):
            self.assertTrue(
                _wait_gone(info[how]["pid"]), f"{how}: synapse still running"
            )
        if self.DATABASE == "postgres":
            self.assertFalse(postgres_database_exists(info["term"]["db"]))
            # Nothing runs at SIGKILL: the database is left for `fedkit gc`.
            drop_postgres_database(info["kill"]["db"])
