"""Proves the kit's worker deployment: every process (and nginx) is started,
reachable through nginx, and stopped, also when the start fails."""

from __future__ import annotations

import time

import psutil
import requests

from tests.fedkit.homeserver import HomeserverStartError
from tests.fedkit.postgres import postgres_database_exists
from tests.fedkit.testcase import FederationTestCase
from tests.fedkit.workers import VERSION_PATH, WorkerHomeserver, unavailable_reason
from tests.kit.test_kit import _wait_gone

PROCESSES = {
    "main",
    "nginx",
    *WorkerHomeserver.FEDERATION_WORKERS,
    WorkerHomeserver.SYNC_WORKER,
    WorkerHomeserver.CLIENT_WORKER,
    WorkerHomeserver.SENDER,
    WorkerHomeserver.BACKGROUND,
}


def _listening_ports() -> set[int]:
    return {
        c.laddr.port
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


class WorkerKitTests(FederationTestCase):
    DATABASE = "postgres"

    def setUp(self) -> None:
        super().setUp()
        reason = unavailable_reason()
        if reason is not None:
            self.skipTest(reason)

    def test_start_restart_a_worker_and_cleanup(self) -> None:
        hs = self.make_worker_homeserver("hs", with_module=False)
        pids = hs.pids
        self.assertEqual(set(pids), PROCESSES)
        alice = self.register(hs, "alice")
        room_id = alice.create_room(preset="private_chat")
        self.assertIn(room_id, alice.joined_rooms())

        old = pids[hs.CLIENT_WORKER]
        hs.restart_worker(hs.CLIENT_WORKER)
        self.assertTrue(_wait_gone(old))
        self.assertNotEqual(hs.pids[hs.CLIENT_WORKER], old)
        self.assertIn(room_id, alice.joined_rooms())

        # Federation routed to the main process alone, then back to the
        # federation workers (the worker benchmark's two set-ups).
        hs.route_federation("main")
        self.assertEqual(self._version_served_by(hs), {"main"})
        hs.route_federation("workers")
        self.assertLessEqual(self._version_served_by(hs), set(hs.FEDERATION_WORKERS))
        with self.assertRaises(ValueError):
            hs.route_federation("everywhere")

        pids = hs.pids
        ports = {hs.federation_port, hs.client_port, hs.main_http_port}
        hs.cleanup()
        for name, pid in pids.items():
            self.assertTrue(_wait_gone(pid), f"{name} still running")
        self.assertEqual(hs.pids, {})
        self.assertFalse(ports & _listening_ports())
        assert hs.database_name is not None
        self.assertFalse(postgres_database_exists(hs.database_name))

    def _version_served_by(self, hs: WorkerHomeserver) -> set[str]:
        """Who answered four federation ``/version`` requests, per nginx."""
        offset = hs.access_log_offset()
        for _ in range(4):
            r = requests.get(
                f"{hs.federation_url}{VERSION_PATH}",
                verify=hs.ca.cert_path,
                timeout=10,
            )
            self.assertEqual(r.status_code, 200)
        time.sleep(0.3)
        return hs.upstreams(VERSION_PATH, since=offset)

    def test_a_worker_failing_to_start_stops_everything(self) -> None:
        hs = self.make_worker_homeserver("hs", with_module=False, start=False)
        hs.workers[hs.SYNC_WORKER].extra = {"worker_app": "synapse.app.no_such_app"}
        hs.write_config()
        with self.assertRaises(HomeserverStartError) as cm:
            hs.start(timeout=90)
        self.assertIn(hs.SYNC_WORKER, str(cm.exception))
        self.assertEqual(hs.pids, {})
        self.assertFalse(hs.is_running())
        for worker in hs.workers.values():
            self.assertTrue(worker.proc is None or worker.proc.poll() is not None)
