"""The streamed ``/state`` parser (``joining/state_parser.py``)."""

from __future__ import annotations

import json
import unittest
from typing import Any

from canonicaljson import encode_canonical_json

from synapse_partial_state.joining.state_parser import StatePdus, StatePdusParser
from synapse_partial_state.wire import MEMBERS_ONLY_PARAM


def parse(body: bytes, step: int = 7, seen: list[Any] | None = None) -> StatePdus:
    parser = StatePdusParser(seen.append if seen is not None else None)
    for start in range(0, len(body), step):
        parser.write(body[start : start + step])
    return parser.finish()


class StatePdusParserTests(unittest.TestCase):
    PDU = {"type": "m.room.member", "state_key": "@a:x", "depth": 3, "b": 1.5}
    AUTH = {"type": "m.room.create", "state_key": "", "depth": 1}

    def test_pdus_and_auth_chain_as_canonical_json_in_any_chunking(self) -> None:
        body = json.dumps({"pdus": [self.PDU], "auth_chain": [self.AUTH]}).encode()
        for step in (1, 7, len(body)):
            result = parse(body, step)
            self.assertEqual(result.pdus, [encode_canonical_json(self.PDU)])
            self.assertEqual(result.auth_chain, [encode_canonical_json(self.AUTH)])
            self.assertFalse(result.members_only)

    def test_on_pdu_sees_every_object_of_both_lists(self) -> None:
        seen: list[Any] = []
        body = json.dumps({"auth_chain": [self.AUTH], "pdus": [self.PDU]}).encode()
        parse(body, seen=seen)
        self.assertCountEqual(seen, [self.PDU, self.AUTH])

    def test_items_that_are_not_objects_are_left_out(self) -> None:
        body = json.dumps({"pdus": [1, "x", None, [self.PDU], self.PDU]}).encode()
        self.assertEqual(parse(body).pdus, [encode_canonical_json(self.PDU)])

    def test_members_only_marker_only_when_true(self) -> None:
        for value, want in ((True, True), (False, False), ("true", False)):
            body = json.dumps({"pdus": [], MEMBERS_ONLY_PARAM: value}).encode()
            self.assertEqual(parse(body).members_only, want, value)
