"""The members policy (``clients.members_during_resync``), with Synapse faked."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.clients.members import (
    MembersDuringResync,
    answers_at_once,
    mark_members,
)
from synapse_partial_state.compat.clients import MemberSummary
from synapse_partial_state.config import MEMBERS_BLOCK, MEMBERS_PARTIAL, ClientsConfig
from synapse_partial_state.wire import SUMMARY_FIELD, SYNCING_FIELD

SUMMARY = MemberSummary(("@a:x",), joined_member_count=7, invited_member_count=2)


class Facts:
    def __init__(self, partial: set[str], encrypted: set[str]) -> None:
        self.partial, self.encrypted = partial, encrypted
        self.reads: list[tuple[str, str]] = []

    async def is_partial_state(self, room_id: str) -> bool:
        self.reads.append(("partial", room_id))
        return room_id in self.partial

    async def is_encrypted(self, room_id: str) -> bool:
        self.reads.append(("encrypted", room_id))
        return room_id in self.encrypted

    async def member_summary(self, room_id: str, user_id: str) -> MemberSummary:
        self.reads.append(("summary", room_id))
        return SUMMARY


def run(coro: Any) -> Any:
    return unittest.TestCase().successResultOf(defer.ensureDeferred(coro))


class AnswersAtOnceTests(unittest.TestCase):
    def test_only_partial_policy_partial_room_unencrypted(self) -> None:
        self.assertTrue(answers_at_once(MEMBERS_PARTIAL, True, False))
        self.assertFalse(answers_at_once(MEMBERS_PARTIAL, True, True))
        self.assertFalse(answers_at_once(MEMBERS_PARTIAL, False, False))
        self.assertFalse(answers_at_once(MEMBERS_BLOCK, True, False))

    def test_block_reads_nothing(self) -> None:
        facts = Facts({"!r:x"}, set())
        policy = MembersDuringResync(ClientsConfig(), facts)
        self.assertFalse(run(policy.answers_at_once("!r:x")))
        self.assertEqual(facts.reads, [])

    def test_partial(self) -> None:
        facts = Facts({"!r:x", "!e:x"}, {"!e:x"})
        policy = MembersDuringResync(ClientsConfig(MEMBERS_PARTIAL), facts)
        self.assertTrue(run(policy.answers_at_once("!r:x")))
        self.assertFalse(run(policy.answers_at_once("!e:x")))  # encrypted
        self.assertFalse(run(policy.answers_at_once("!full:x")))  # not partial
        self.assertNotIn(("encrypted", "!full:x"), facts.reads)


class MarkTests(unittest.TestCase):
    def test_marker_and_counts(self) -> None:
        body: dict[str, Any] = {"chunk": []}
        mark_members(body, SUMMARY)
        self.assertEqual(
            body,
            {
                "chunk": [],
                SYNCING_FIELD: True,
                SUMMARY_FIELD: {
                    "m.joined_member_count": 7,
                    "m.invited_member_count": 2,
                },
            },
        )

    def test_policy_marks_with_the_room_summary(self) -> None:
        facts = Facts({"!r:x"}, set())
        policy = MembersDuringResync(ClientsConfig(MEMBERS_PARTIAL), facts)
        body: dict[str, Any] = {"joined": {}}
        run(policy.mark(body, "!r:x"))
        self.assertIs(body[SYNCING_FIELD], True)
        self.assertEqual(body[SUMMARY_FIELD]["m.joined_member_count"], 7)
