"""Signing keys through a notary: a joiner whose Synapse trusts the fake peer's
notary (``trusted_key_servers``) gets the keys of the room's 50 servers from it,
in a few batched ``POST /_matrix/key/v2/query`` requests (Synapse's own check at
the join, then the module's prefetch at the start of the resync), and asks no
server for its own keys; when the notary fails, the prefetch asks the servers
themselves and the resync completes all the same."""

from __future__ import annotations

import re
import time
from typing import Any

from tests.blackbox.resync_case import FAST, ResyncCase
from tests.fedkit.hsconfig import deep_merge, trusted_key_servers
from tests.fedkit.process import read_from

QUERY_PATH = r"^/_matrix/key/v2/query"
SERVER_KEY_PATH = r"^/_matrix/key/v2/server"
PREFETCHED = (
    r"Resync of (\S+): prefetched signing keys of (\d+) server\(s\) in \S+ s "
    r"\((\d+) from notaries in (\d+) request\(s\), (\d+) from the servers, "
    r"(\d+) failed, (\d+) already stored\)"
)


class NotaryKeys(ResyncCase):
    MEMBERS = 300
    SERVERS = 50

    def setup_with_notary(self) -> None:
        self.peer = self.make_fake_peer()
        self.room = self.peer.create_room(
            members=self.MEMBERS,
            servers=self.SERVERS,
            name="Notary room",
            room_version="10",
        )
        self.room_id = self.room["room_id"]
        self.resident = self.room["resident"]
        self.notary = self.peer.notary()
        fast: dict[str, Any] = dict(FAST)
        extra = deep_merge(fast["extra_config"], trusted_key_servers(self.notary))
        self.hs2 = self.make_homeserver(
            "hs2", module_config=fast["module_config"], extra_config=extra
        )
        self.admin = self.register(self.hs2, "admin", admin=True)
        self.bob = self.register(self.hs2, "bob")

    def join_and_complete(self) -> re.Match[str]:
        """bob joins via the fake resident; the resync completes with every
        member; returns the resync's prefetch log line."""
        since = self.hs2.log_offset()
        self.t0 = time.time()
        self.bob.join(self.room_id, via=[self.resident])
        self.wait_complete(since)
        self.assert_full_members()
        self.hs2.wait_for_log(PREFETCHED, since=since)
        line = re.search(PREFETCHED, read_from(self.hs2.log_path, since))
        assert line is not None
        self.assertEqual(line.group(1), self.room_id)
        return line

    def key_requests(self, path: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.peer.requests(path_regex=path, since=self.t0)
            if r["origin"] in (None, self.hs2.server_name)
        ]

    def test_keys_come_from_the_notary_in_batches(self) -> None:
        self.setup_with_notary()
        line = self.join_and_complete()
        queries = self.key_requests(QUERY_PATH)
        # Synapse's check of the partial /send_join answer asked the notary, then
        # the resync's prefetch asked it for every other server of the room.
        self.assertTrue(queries)
        self.assertEqual({r["server"] for r in queries}, {self.notary["server_name"]})
        self.assertEqual({r["method"] for r in queries}, {"POST"})
        self.assertEqual({r["status"] for r in queries}, {200})
        self.assertLessEqual(len(queries), 5, queries)
        # every fake server of the room (the resident included) is vouched for,
        # either by Synapse's own notary check or by the prefetch
        fetched, from_notary, requests, direct, failed, stored = (
            int(line.group(i)) for i in range(2, 8)
        )
        self.assertEqual((direct, failed), (0, 0), line.group(0))
        self.assertEqual(from_notary, fetched)
        self.assertGreater(from_notary, 0)
        self.assertLessEqual(requests, 2)
        self.assertEqual(from_notary + stored, self.SERVERS)
        # ... and no server was asked for its own keys
        self.assertEqual(self.key_requests(SERVER_KEY_PATH), [])
        rows = self.hs2.sql(
            "SELECT DISTINCT server_name FROM server_keys_json WHERE from_server = ?",
            (self.notary["server_name"],),
        )
        self.assertEqual({str(r[0]) for r in rows}, set(self.room["servers"]))

    def test_servers_are_asked_when_the_notary_fails(self) -> None:
        self.setup_with_notary()
        self.peer.add_behaviour(QUERY_PATH, "error", status=502)
        line = self.join_and_complete()
        fetched, from_notary, requests, direct, failed, stored = (
            int(line.group(i)) for i in range(2, 8)
        )
        self.assertEqual((from_notary, failed), (0, 0), line.group(0))
        self.assertGreaterEqual(requests, 1)
        self.assertEqual(direct + stored, self.SERVERS)
        self.assertGreater(direct, 0)
        asked = {r["server"] for r in self.key_requests(SERVER_KEY_PATH)}
        self.assertEqual(asked, set(self.room["servers"]))
