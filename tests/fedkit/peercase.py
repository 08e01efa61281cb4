"""A test case with a fresh fake federation peer per test, and helpers for
unauthenticated TLS federation calls to its servers and checking their events."""

from __future__ import annotations

import shutil
import tempfile
import time
import unittest
from typing import Any
from urllib.parse import quote

import requests
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from synapse.api.room_versions import RoomVersion
from synapse.crypto.event_signing import check_event_content_hash
from synapse.event_auth import validate_event_for_room_version
from synapse.events import EventBase, make_event_from_dict
from synapse.events.utils import prune_event
from unpaddedbase64 import decode_base64

from tests.fedkit.fakepeer.control_client import FakePeer

JsonDict = dict[str, Any]


def q(s: str) -> str:
    """Quote one URL path segment."""
    return quote(s, safe="")


class PeerTestCase(unittest.TestCase):
    """Starts a fresh fake peer per test; helpers for TLS federation calls."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fakepeer-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.peer = FakePeer(f"{self.tmp}/peer", f"{self.tmp}/ca")
        self.addCleanup(self.peer.stop)
        self.peer.start(timeout=30)
        self.http = requests.Session()
        self.addCleanup(self.http.close)
        self._keys: dict[str, dict[str, Any]] = {}

    def fed(
        self,
        server: str,
        method: str,
        path: str,
        params: Any = None,
        json: Any = None,
        timeout: float = 60,
    ) -> requests.Response:
        """An (unauthenticated) federation request to a fake server."""
        return self.http.request(
            method,
            f"https://{server}{path}",
            params=params,
            json=json,
            verify=self.peer.ca_path,
            timeout=timeout,
        )

    def server_keys(self, server: str) -> dict[str, Any]:
        """Verify keys of ``server`` from its own key endpoint (self-signature checked)."""
        if server not in self._keys:
            body = self.fed(server, "GET", "/_matrix/key/v2/server").json()
            self.assertEqual(body["server_name"], server)
            keys = {
                kid: decode_verify_key_bytes(kid, decode_base64(v["key"]))
                for kid, v in body["verify_keys"].items()
            }
            for vk in keys.values():
                verify_signed_json(body, server, vk)
            self.assertGreater(body["valid_until_ts"], time.time() * 1000 + 86400_000)
            self._keys[server] = keys
        return self._keys[server]

    def check_event_crypto(
        self, rv: RoomVersion, pdu: JsonDict, expected_id: str | None
    ) -> EventBase:
        """Content hash, sender-server signature and event id of one PDU."""
        ev = make_event_from_dict(dict(pdu), rv)
        if expected_id is not None:
            self.assertEqual(ev.event_id, expected_id)
        self.assertTrue(check_event_content_hash(ev), ev.event_id)
        sender_server = ev.sender.split(":", 1)[1]
        keys = self.server_keys(sender_server)
        redacted = prune_event(ev).get_pdu_json()
        for vk in keys.values():
            verify_signed_json(redacted, sender_server, vk)
        validate_event_for_room_version(ev)
        return ev
