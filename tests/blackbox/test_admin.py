"""The admin API (``/_synapse/client/partial_state/v1/admin/rooms``) against a
real joiner: listing, retry now, abort, access, and Synapse's delete-room API
mid-resync. Each test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from urllib.parse import quote

from tests.blackbox.resync_case import ADMIN, STATE_PATHS, ResyncCase, wait_until
from tests.fedkit.testcase import on_both_databases


@on_both_databases
class AdminApi(ResyncCase):
    def test_list_retry_abort_and_auth(self) -> None:
        self.setup_room(module_config={"resync": {"initial_backoff_seconds": 60}})
        rule = self.peer.add_behaviour(STATE_PATHS, "error", status=502)
        self.bob.join(self.room_id, via=[self.resident])
        job = self.wait_phase("retrying")
        self.assertGreater(job["next_attempt_ts"], int(time.time() * 1000) + 30_000)

        status, body = self.admin.get(ADMIN)
        self.assertEqual(status, 200)
        listed = {j["room_id"]: j for j in body["rooms"]}
        self.assertEqual(listed[self.room_id]["phase"], "retrying")
        self.assertTrue(listed[self.room_id]["running"])

        # Non-admins are refused.
        status, body = self.bob.get(ADMIN)
        self.assertEqual((status, body.get("errcode")), (403, "M_FORBIDDEN"))
        status, body = self.bob.post(f"{ADMIN}/{quote(self.room_id)}/retry", json={})
        self.assertEqual(status, 403)

        # "retry now" ends a 60 s back-off at once.
        self.peer.remove_behaviour(rule)
        since = self.hs2.log_offset()
        status, body = self.admin.post(f"{ADMIN}/{quote(self.room_id)}/retry", json={})
        self.assertEqual(status, 200, body)
        self.wait_complete(since, timeout=30)
        self.assert_full_members()

        status, body = self.admin.post(f"{ADMIN}/{quote('!nope:x')}/abort", json={})
        self.assertEqual(status, 404)


@on_both_databases
class AdminAbortAndPurge(ResyncCase):
    def test_admin_abort_refused_while_local_users_are_in_the_room(self) -> None:
        self.setup_room()
        self.join_while_state_fails()
        status, body = self.admin.post(f"{ADMIN}/{quote(self.room_id)}/abort", json={})
        self.assertEqual(status, 409, body)
        self.assertIn("Local users are still in the room", body["error"])
        self.assertEqual(self.job()["phase"], "retrying")

    def test_room_deleted_and_purged_mid_resync(self) -> None:
        self.setup_room()
        rule = self.join_while_state_fails()
        # Synapse's own delete-room admin API: kicks local users, then purges.
        status, body = self.admin.request(
            "DELETE",
            f"/_synapse/admin/v2/rooms/{quote(self.room_id)}",
            json={"purge": True},
        )
        self.assertEqual(status, 200, body)
        delete_id = body["delete_id"]

        def purged() -> bool:
            st, b = self.admin.get(
                f"/_synapse/admin/v2/rooms/delete_status/{delete_id}"
            )
            return st == 200 and b["status"] == "complete"

        wait_until(purged, 60, "the delete-room job")
        job = self.wait_phase("aborted", timeout=30)
        self.assertTrue(job["last_error"])
        # A fresh join afterwards works end to end.
        self.heal_and_join_again(rule)
