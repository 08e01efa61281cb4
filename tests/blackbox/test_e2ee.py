"""A real end-to-end-encrypted conversation across a resync (issue #16), with a
real Matrix E2EE client library (matrix-nio with its ``e2e`` extra, on
vodozemac).

The room is hosted by the fake peer (its resident) and encrypted. alice (on
``hs1``, a real Synapse, fully joined) and bob (on ``hs2``, a real Synapse with
the module, joining partially) talk in it. The resident leaves ``hs1`` out of
the ``servers_in_room`` it gives ``hs2``, and holds ``hs2``'s resync while both
add a device: ``hs1`` has cached bob's device list before his new device, so
only ``hs2``'s replay at completion tells it; ``hs2`` learns of alice's new
device from an update it receives while it does not know she is in the room.
Right after completion each side sends an encrypted message, and every other
device of both users decrypts it; ``/keys/query`` and ``/sync``'s
``device_lists.changed`` are right on both sides.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    LoginResponse,
    RoomMessageText,
    RoomSendResponse,
)

from tests.blackbox.resync_case import FAST, STATE_PATHS, wait_until
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client
from tests.fedkit.testcase import FederationTestCase, on_both_databases

PASSWORD = "pw"  # the kit's registration password


class Device:
    """One E2EE device: a matrix-nio client logged in with a new device."""

    def __init__(self, hs: Homeserver, user_id: str, store: str) -> None:
        os.makedirs(store, exist_ok=True)
        self.client = AsyncClient(
            hs.client_url,
            user_id,
            store_path=store,
            config=AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False),
        )
        self.device_id = ""

    async def login(self, name: str) -> None:
        response = await self.client.login(PASSWORD, device_name=name)
        assert isinstance(response, LoginResponse), response
        self.device_id = response.device_id
        await self.sync()

    async def sync(self, timeout_ms: int = 0) -> Any:
        client = self.client
        response = await client.sync(timeout=timeout_ms)
        if client.should_upload_keys:
            await client.keys_upload()
        if client.should_query_keys:
            await client.keys_query()
        return response

    async def send(self, room_id: str, body: str) -> None:
        await self.sync()
        response = await self.client.room_send(
            room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            ignore_unverified_devices=True,
        )
        assert isinstance(response, RoomSendResponse), response

    async def wait_for_message(self, room_id: str, body: str, timeout: float) -> None:
        """Sync until ``body`` arrives decrypted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = await self.sync(timeout_ms=2000)
            room = getattr(response, "rooms", None)
            joined = room.join.get(room_id) if room is not None else None
            if joined is None:
                continue
            for event in joined.timeline.events:
                if isinstance(event, RoomMessageText) and event.body == body:
                    return
        raise TimeoutError(
            f"{self.client.user_id}/{self.device_id}: {body!r} not decrypted"
        )

    async def close(self) -> None:
        await self.client.close()


@on_both_databases(ci_database="postgres")
class EncryptedConversationTests(FederationTestCase):
    def test_encrypted_messages_right_after_completion(self) -> None:
        peer = self.make_fake_peer()
        room = peer.create_room(
            members=2, servers=1, name="Encrypted room", room_version="10"
        )
        room_id, resident = room["room_id"], room["resident"]
        peer.send_event(
            room_id,
            "m.room.encryption",
            {"algorithm": "m.megolm.v1.aes-sha2"},
            state_key="",
            destinations=[],
        )
        fast: dict[str, Any] = dict(FAST)
        hs1, hs2 = self.make_homeservers(["hs1", "hs2"], **fast)
        alice: Client = self.register(hs1, "alice")
        bob: Client = self.register(hs2, "bob")
        peer.hide_servers(room_id, [hs1.server_name])

        alice.join(room_id, via=[resident])
        wait_until(
            lambda: not hs1.sql("SELECT 1 FROM partial_state_rooms"),
            120,
            "hs1 complete",
        )
        asyncio.run(self._conversation(peer, hs1, hs2, alice, bob, room_id, resident))

    async def _conversation(
        self,
        peer: Any,
        hs1: Homeserver,
        hs2: Homeserver,
        alice: Client,
        bob: Client,
        room_id: str,
        resident: str,
    ) -> None:
        alice1 = Device(hs1, alice.user_id, os.path.join(self.workdir, "alice1"))
        bob1 = Device(hs2, bob.user_id, os.path.join(self.workdir, "bob1"))
        alice2 = Device(hs1, alice.user_id, os.path.join(self.workdir, "alice2"))
        bob2 = Device(hs2, bob.user_id, os.path.join(self.workdir, "bob2"))
        devices = [alice1, bob1, alice2, bob2]
        try:
            await alice1.login("alice1")
            await bob1.login("bob1")
            alice_since = alice.sync()["next_batch"]
            bob_since = bob.sync()["next_batch"]

            # bob joins; the resync waits for the resident.
            rule = peer.add_behaviour(STATE_PATHS, "hold")
            bob.join(room_id, via=[resident])
            self.assertTrue(hs2.sql("SELECT 1 FROM partial_state_rooms"))
            wait_until(
                lambda: hs1.sql(
                    "SELECT 1 FROM current_state_events WHERE room_id = ?"
                    " AND state_key = ? AND membership = 'join'",
                    (room_id, bob.user_id),
                ),
                60,
                "bob's join at hs1",
            )
            # hs1 caches bob's device list (bob1's device only).
            self.assertEqual(self.devices_of(alice, bob.user_id), self.ids(bob1))
            wait_until(
                lambda: hs1.sql(
                    "SELECT 1 FROM device_lists_remote_extremeties WHERE user_id = ?",
                    (bob.user_id,),
                ),
                30,
                "bob's device list cached at hs1",
            )

            # A new device on each side during the resync.
            await alice2.login("alice2")
            await bob2.login("bob2")
            self.assertTrue(hs2.sql("SELECT 1 FROM partial_state_rooms"))

            since = hs2.log_offset()
            peer.remove_behaviour(rule)
            hs2.wait_for_log(
                rf"Resync of {re.escape(room_id)} complete", timeout=120, since=since
            )

            # /keys/query and device_lists.changed on both sides.
            wait_until(
                lambda: self.devices_of(alice, bob.user_id) == self.ids(bob1, bob2),
                60,
                "bob's new device at hs1",
            )
            wait_until(
                lambda: self.devices_of(bob, alice.user_id) == self.ids(alice1, alice2),
                60,
                "alice's devices at hs2",
            )
            self.assertIn(bob.user_id, self.changed(alice, alice_since, room_id))
            self.assertIn(alice.user_id, self.changed(bob, bob_since, room_id))

            # Each side sends; every other device decrypts.
            await alice1.send(room_id, "from alice")
            for device in (alice2, bob1, bob2):
                await device.wait_for_message(room_id, "from alice", 60)
            await bob1.send(room_id, "from bob")
            for device in (alice1, alice2, bob2):
                await device.wait_for_message(room_id, "from bob", 60)
        finally:
            for device in devices:
                await device.close()

    @staticmethod
    def ids(*devices: Device) -> set[str]:
        return {d.device_id for d in devices}

    def devices_of(self, client: Client, user_id: str) -> set[str]:
        """The devices with keys ``client``'s server gives for ``user_id``."""
        status, body = client.post(
            "/_matrix/client/v3/keys/query", {"device_keys": {user_id: []}}
        )
        self.assertEqual(status, 200, body)
        return set((body.get("device_keys") or {}).get(user_id, {}))

    def changed(self, client: Client, since: str, room_id: str) -> set[str]:
        """Users in ``client``'s ``device_lists.changed`` since ``since``."""
        filt = json.dumps(client.lazy_loading_filter(room_id))
        body = client.sync(since=since, filter=filt)
        return set(body.get("device_lists", {}).get("changed", []))
