"""How ``/state`` answers are assembled (``resident/answer.py``)."""

from __future__ import annotations

import json
import unittest

from synapse_partial_state.resident.answer import (
    blocks,
    split_state,
    state_before,
    state_body_parts,
)
from synapse_partial_state.wire import MEMBERS_ONLY_PARAM

MEMBER = "m.room.member"


class AnswerAssemblyTests(unittest.TestCase):
    def test_state_body_is_the_json_of_its_parts(self) -> None:
        pdus = [b'{"a":1}', b"", b'{"b":2}']  # b"": loaded, never sent
        auth = [b'{"c":3}']
        length, parts = state_body_parts(pdus, auth, members_only=False)
        body = b"".join(parts)
        self.assertEqual(len(body), length)
        self.assertEqual(
            json.loads(body), {"pdus": [{"a": 1}, {"b": 2}], "auth_chain": [{"c": 3}]}
        )
        length, parts = state_body_parts([], [], members_only=True)
        self.assertEqual(
            json.loads(b"".join(parts)),
            {"pdus": [], "auth_chain": [], MEMBERS_ONLY_PARAM: True},
        )

    def test_blocks_join_small_pieces(self) -> None:
        pieces = [b"x" * 10] * 25
        out = list(blocks(pieces, size=100))
        self.assertEqual([len(b) for b in out], [100, 100, 50])
        self.assertEqual(b"".join(out), b"".join(pieces))
        self.assertEqual(list(blocks([], size=100)), [])

    def test_state_before_an_event(self) -> None:
        group = {("m.room.create", ""): "$c", (MEMBER, "@a:x"): "$a2"}
        # A non-state event: its group is the state before it.
        self.assertEqual(state_before(group, None, "$msg"), group)
        # A state event that replaced another: that one instead.
        self.assertEqual(
            state_before(group, ((MEMBER, "@a:x"), "$a1"), "$a2"),
            {("m.room.create", ""): "$c", (MEMBER, "@a:x"): "$a1"},
        )
        # A state event at a new key: not there.
        self.assertEqual(
            state_before(group, ((MEMBER, "@a:x"), None), "$a2"),
            {("m.room.create", ""): "$c"},
        )
        with self.assertRaises(AssertionError):
            state_before(group, ((MEMBER, "@b:x"), None), "$b")
        self.assertEqual(split_state(group), (("$c", "$a2"), ("$a2",)))
