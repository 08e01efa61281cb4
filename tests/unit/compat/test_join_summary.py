"""The summary field read off Synapse's own ``/send_join`` parser (the real
``SendJoinParser``, fed a v2 answer in pieces)."""

from __future__ import annotations

import json
from typing import Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.federation.transport.client import SendJoinParser
from twisted.trial import unittest

from synapse_partial_state.compat.join_summary import install_join_summary_capture
from synapse_partial_state.wire import SUMMARY_FIELD

SUMMARY = {"m.heroes": ["@a:x"], "m.joined_member_count": 7}
JOIN = {
    "room_id": "!r:x",
    "type": "m.room.member",
    "state_key": "@b:y",
    "sender": "@b:y",
    "content": {"membership": "join"},
    "auth_events": [],
    "prev_events": [],
    "depth": 5,
    "origin_server_ts": 1,
    "hashes": {"sha256": "x"},
    "signatures": {},
}


class SummaryCaptureTests(unittest.TestCase):
    def setUp(self) -> None:
        self.got: list[tuple[str, str, Any]] = []
        install_join_summary_capture(lambda *a: self.got.append(a))

    def parse(self, body: dict[str, Any], v1: bool = False) -> Any:
        data = json.dumps([200, body] if v1 else body).encode()
        parser = SendJoinParser(KNOWN_ROOM_VERSIONS["10"], v1)
        for i in range(0, len(data), 7):  # streamed in small pieces
            parser.write(data[i : i + 7])
        return parser.finish()

    def test_summary_handed_over_with_the_join(self) -> None:
        body = {"state": [], "auth_chain": [], "event": JOIN, SUMMARY_FIELD: SUMMARY}
        response = self.parse(body)
        self.assertEqual(self.got, [("!r:x", response.event.event_id, SUMMARY)])
        self.assertEqual(response.state, [])  # Synapse's own fields as before

    def test_none_without_the_field_or_in_v1(self) -> None:
        self.parse({"state": [], "auth_chain": [], "event": JOIN})
        self.parse({"event": JOIN, SUMMARY_FIELD: SUMMARY}, v1=True)
        self.assertEqual(self.got, [])
