"""The fake peer as a notary (``/_matrix/key/v2/query``): its answers carry the
queried servers' own key responses, each countersigned by the notary, many
servers in one batched request, and only responses valid until the query's
``minimum_valid_until_ts``. No real Synapse here (``tests.blackbox.test_join_keys``
has Synapse trusting it)."""

from __future__ import annotations

import time
from typing import Any

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from tests.fedkit.hsconfig import trusted_key_servers
from tests.fedkit.peercase import PeerTestCase, q

QUERY = "/_matrix/key/v2/query"


class NotaryTests(PeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.notary = self.peer.notary()
        self.name = self.notary["server_name"]
        self.notary_keys = {
            kid: decode_verify_key_bytes(kid, decode_base64(b64))
            for kid, b64 in self.notary["verify_keys"].items()
        }

    def check_notarised(self, entry: dict[str, Any]) -> str:
        """``entry`` is signed by its server (with the key its own endpoint
        gives) and by the notary; returns the server's name."""
        server = entry["server_name"]
        own = self.server_keys(server)
        self.assertEqual(set(entry["verify_keys"]), set(own))
        for vk in own.values():
            verify_signed_json(entry, server, vk)
        for vk in self.notary_keys.values():
            verify_signed_json(entry, self.name, vk)
        return str(server)

    def test_dedicated_notary_is_stable_and_configurable(self) -> None:
        self.assertEqual(self.peer.notary(), self.notary)
        # a server of the peer, reachable over the kit's TLS, in no room
        self.assertIn(self.name, {s["name"] for s in self.peer.servers()})
        self.assertEqual(self.peer.rooms(), [])
        self.server_keys(self.name)
        self.assertEqual(
            trusted_key_servers(self.notary),
            {
                "trusted_key_servers": [
                    {
                        "server_name": self.name,
                        "verify_keys": self.notary["verify_keys"],
                    }
                ]
            },
        )

    def test_batch_of_many_servers_in_one_request(self) -> None:
        servers = self.peer.create_servers(300)
        since = time.time()
        query: dict[str, Any] = {s: {} for s in servers[:150]}
        # key ids and minimum_valid_until_ts for the others, as Synapse asks
        for s in servers[150:]:
            query[s] = {
                "ed25519:fake1": {"minimum_valid_until_ts": int(time.time() * 1000)}
            }
        # no such servers: left out (asked for, when key ids are named)
        query["127.0.0.1:1"] = {}
        query["127.0.0.1:2"] = {"ed25519:x": {}}
        resp = self.fed(self.name, "POST", QUERY, json={"server_keys": query})
        self.assertEqual(resp.status_code, 200, resp.text)
        entries = resp.json()["server_keys"]
        self.assertEqual(
            sorted(self.check_notarised(e) for e in entries), sorted(servers)
        )
        log = self.peer.requests(path_regex=f"^{QUERY}", since=since)
        self.assertEqual(
            [(r["server"], r["method"]) for r in log], [(self.name, "POST")]
        )

    def test_a_forged_countersignature_does_not_verify(self) -> None:
        server = self.peer.create_servers(1)[0]
        other = self.peer.create_servers(1)[0]
        # another fake server answers as a notary too, with its own key
        entry = self.fed(
            other, "POST", QUERY, json={"server_keys": {server: {}}}
        ).json()["server_keys"][0]
        entry["signatures"][self.name] = entry["signatures"].pop(other)
        with self.assertRaises(SignatureVerifyException):
            for vk in self.notary_keys.values():
                verify_signed_json(entry, self.name, vk)

    def test_minimum_valid_until_ts(self) -> None:
        a, b = self.peer.create_servers(2)
        # the peer's fake keys are valid until the same far-off time
        until = self.fed(a, "GET", "/_matrix/key/v2/server").json()["valid_until_ts"]
        far = until + 1
        body = {
            "server_keys": {
                a: {"ed25519:fake1": {"minimum_valid_until_ts": far}},
                b: {"ed25519:fake1": {"minimum_valid_until_ts": until}},
            }
        }
        entries = self.fed(self.name, "POST", QUERY, json=body).json()["server_keys"]
        self.assertEqual([self.check_notarised(e) for e in entries], [b])
        for e in entries:
            self.assertGreaterEqual(e["valid_until_ts"], until)
        # the single-server form, with the minimum in the query string
        for minimum, expected in ((None, [a]), (until, [a]), (far, [])):
            params = {} if minimum is None else {"minimum_valid_until_ts": minimum}
            resp = self.fed(self.name, "GET", f"{QUERY}/{q(a)}", params=params)
            self.assertEqual(resp.status_code, 200, resp.text)
            got = [self.check_notarised(e) for e in resp.json()["server_keys"]]
            self.assertEqual(got, expected, minimum)
        bad = self.fed(self.name, "POST", QUERY, json={"server_keys": {a: []}})
        self.assertEqual(bad.status_code, 400)
        bad = self.fed(
            self.name, "GET", f"{QUERY}/{q(a)}", params={"minimum_valid_until_ts": "x"}
        )
        self.assertEqual(bad.status_code, 400)
