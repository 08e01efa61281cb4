"""The admin API (``/_synapse/admin/v1/partial_state/rooms``) against a real
joiner: listing, retry now, abort, access, and Synapse's delete-room API
mid-resync; and where the admin API and the status endpoint answer. Each test
runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from urllib.parse import quote

import requests

from tests.blackbox.endpoints import ADMIN, STATUS
from tests.blackbox.resync_case import DOWN_SERVERS, STATE_PATHS, ResyncCase, wait_until
from tests.fedkit.testcase import FederationTestCase, on_both_databases

#: Where the admin API was before it moved under Synapse's admin prefix.
OLD_ADMIN = "/_synapse/client/partial_state/v1/admin/rooms"
MINIMAL_STATUS_KEYS = {
    "module",
    "version",
    "loaded",
    "patches_active",
    "patches_reason",
}


@on_both_databases(ci_database="postgres")
class WhereTheEndpointsAnswer(FederationTestCase):
    """The admin API lives under Synapse's admin prefix; the status endpoint tells
    anyone only that the module is loaded, and a server admin everything; neither
    answers on a listener that does not serve the client API (the kit's federation
    listener serves only ``federation``, ``keys`` and ``openid``)."""

    def setUp(self) -> None:
        (self.hs,) = self.make_homeservers(["hs"])
        self.admin = self.register(self.hs, "admin", admin=True)
        self.user = self.register(self.hs, "user")
        self.anonymous = requests.Session()
        self.anonymous.trust_env = False
        self.addCleanup(self.anonymous.close)

    def test_admin_api_under_synapse_admin_prefix_for_admins(self) -> None:
        status, body = self.admin.get(ADMIN)
        self.assertEqual(
            (status, body),
            (
                200,
                {
                    "rooms": [],
                    "incoming_device_list_updates_queued": 0,
                    "patches_active": True,
                    "patches_reason": None,
                },
            ),
        )
        status, body = self.admin.get(f"{ADMIN}/{quote('!nope:x')}")
        self.assertEqual((status, body.get("errcode")), (404, "M_NOT_FOUND"))
        status, body = self.user.get(ADMIN)
        self.assertEqual((status, body.get("errcode")), (403, "M_FORBIDDEN"))
        status, body = self.user.post(f"{ADMIN}/{quote('!r:x')}/retry", json={})
        self.assertEqual((status, body.get("errcode")), (403, "M_FORBIDDEN"))
        r = self.anonymous.get(self.hs.client_url + ADMIN, timeout=30)
        self.assertEqual(r.status_code, 401, r.text)
        # No longer under /_synapse/client.
        status, body = self.admin.get(OLD_ADMIN)
        self.assertEqual(status, 404, body)

    def test_status_is_minimal_unless_asked_by_a_server_admin(self) -> None:
        r = self.anonymous.get(self.hs.client_url + STATUS, timeout=30)
        self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(set(r.json()), MINIMAL_STATUS_KEYS)
        self.assertEqual(r.json()["module"], "synapse_partial_state")
        self.assertIs(r.json()["loaded"], True)
        self.assertIs(r.json()["patches_active"], True)
        self.assertIsNone(r.json()["patches_reason"])
        status, body = self.user.get(STATUS)
        self.assertEqual((status, set(body)), (200, MINIMAL_STATUS_KEYS))
        status, body = self.admin.get(STATUS)
        self.assertEqual(status, 200, body)
        for key in (
            "synapse_version",
            "version_gate",
            "config",
            "patches",
            "mounts",
            "worker",
        ):
            self.assertIn(key, body)
        # An unknown token is refused, as everywhere in Synapse.
        r = self.anonymous.get(
            self.hs.client_url + STATUS,
            headers={"Authorization": "Bearer not-a-token"},
            timeout=30,
        )
        self.assertEqual(r.status_code, 401, r.text)

    def test_nothing_on_a_federation_only_listener(self) -> None:
        # 404 M_UNRECOGNIZED for both, even with an admin's token, as for any
        # path the listener does not serve...
        federation = requests.Session()
        federation.trust_env = False
        federation.verify = self.hs.ca.cert_path
        federation.headers["Authorization"] = f"Bearer {self.admin.access_token}"
        self.addCleanup(federation.close)
        for method, path in (
            ("GET", STATUS),
            ("POST", STATUS),
            ("GET", ADMIN),
            ("GET", f"{ADMIN}/{quote('!r:x')}"),
            ("POST", f"{ADMIN}/{quote('!r:x')}/abort"),
            ("GET", OLD_ADMIN),
        ):
            r = federation.request(method, self.hs.federation_url + path, timeout=30)
            self.assertEqual(
                (r.status_code, r.json().get("errcode")),
                (404, "M_UNRECOGNIZED"),
                f"{method} {path}: {r.text}",
            )
        # ...while it still serves federation.
        r = federation.get(
            self.hs.federation_url + "/_matrix/federation/v1/version", timeout=30
        )
        self.assertEqual(r.status_code, 200, r.text)


@on_both_databases(ci_database="sqlite")
class AdminApi(ResyncCase):
    SERVERS = DOWN_SERVERS

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


@on_both_databases(ci_database="postgres")
class AdminAbortAndPurge(ResyncCase):
    SERVERS = DOWN_SERVERS

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
