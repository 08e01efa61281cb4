"""The backfill seam's pure parts: narrowing a ``/state_ids`` answer at an
event before the join, and skipping the engine's wait within a backfill."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.compat import backfill
from synapse_partial_state.compat.backfill import (
    narrow,
    skip_reuse_while_backfilling,
)

#: State before the join: a remote member $m1 (not stored here), the room's
#: non-member state $pl, $hv2 (stored); its auth chain adds $m1_old. The
#: partial state at the join is not known: stored events count as held.
JOIN_STATE = (
    frozenset({"$m1", "$m2", "$pl", "$hv2"}),
    frozenset({"$m1", "$m2", "$pl", "$hv2", "$m1_old", "$create"}),
    None,
)
#: The same, with the partial state at the join known: $pl, $hv2 and the
#: member $m2 (a hero, say); $m4 is a remote member the resync has stored.
PARTIAL_JOIN_STATE = (
    JOIN_STATE[0] | {"$m4"},
    JOIN_STATE[1] | {"$m4"},
    frozenset({"$pl", "$hv2", "$m2"}),
)


class NarrowTests(unittest.TestCase):
    def test_leaves_out_only_unknown_events_of_the_state_before_the_join(
        self,
    ) -> None:
        """Kept: what is stored ($pl, $m2), and what is not in the state before
        the join ($hv1, an earlier history visibility; $m3, a member who left
        since), stored or not. Left out: $m1, unknown here and still in the
        state at the join (a remote member the resync brings)."""
        answer = {
            "pdu_ids": ["$pl", "$hv1", "$m1", "$m2", "$m3"],
            "auth_chain_ids": ["$create", "$m1_old", "$pl_old"],
        }
        seen = {"$pl", "$m2", "$create", "$hv2"}
        got = narrow(answer, seen, JOIN_STATE)
        self.assertEqual(got["pdu_ids"], ["$pl", "$hv1", "$m2", "$m3"])
        self.assertEqual(got["auth_chain_ids"], ["$create", "$pl_old"])

    def test_auth_chain_before_the_join_is_not_state(self) -> None:
        """An unknown state event at the earlier point that is only in the
        join's auth chain (not its state) was replaced since: kept."""
        answer = {"pdu_ids": ["$m1_old"], "auth_chain_ids": ["$m1_old"]}
        got = narrow(answer, set(), JOIN_STATE)
        self.assertEqual(got["pdu_ids"], ["$m1_old"])
        self.assertEqual(got["auth_chain_ids"], [])

    def test_with_the_partial_state_at_the_join_stored_members_are_left_out(
        self,
    ) -> None:
        """Known partial state at the join: the state at the earlier point is as
        partial as it, whatever the resync has stored. $m4 (stored by the
        resync, not in the partial state) is left out with $m1 (not stored);
        $m2 and $pl (held) are kept, and so are $hv1 and $m3 (not in the state
        before the join), stored or not. Of the auth chain, what is before the
        join and not held is left out ($create, $m1_old, $m4), stored or not;
        $pl_old (replaced before the join) is kept."""
        answer = {
            "pdu_ids": ["$pl", "$hv1", "$m1", "$m2", "$m3", "$m4"],
            "auth_chain_ids": ["$create", "$m1_old", "$m4", "$pl_old"],
        }
        seen = {"$pl", "$m2", "$m4", "$create", "$hv2"}
        got = narrow(answer, seen, PARTIAL_JOIN_STATE)
        self.assertEqual(got["pdu_ids"], ["$pl", "$hv1", "$m2", "$m3"])
        self.assertEqual(got["auth_chain_ids"], ["$pl_old"])
        self.assertEqual(narrow(answer, set(), PARTIAL_JOIN_STATE), got)
        # Not known: $m4, stored, is kept.
        unknown = (*PARTIAL_JOIN_STATE[:2], None)
        got = narrow(answer, seen, unknown)
        self.assertEqual(got["pdu_ids"], ["$pl", "$hv1", "$m2", "$m3", "$m4"])

    def test_other_fields_kept(self) -> None:
        got = narrow({"pdu_ids": [], "extra": 1}, set(), JOIN_STATE)
        self.assertEqual(got, {"pdu_ids": [], "auth_chain_ids": [], "extra": 1})


class ReuseTests(unittest.TestCase):
    def test_engine_answer_asked_outside_a_partial_backfill_only(self) -> None:
        asked: list[tuple[str, str]] = []

        async def reuse(room_id: str, event_id: str) -> str:
            asked.append((room_id, event_id))
            return "engine"

        answer_for = skip_reuse_while_backfilling(reuse)
        got = self.successResultOf(defer.ensureDeferred(answer_for("!r:x", "$e")))
        self.assertEqual(got, "engine")
        token = backfill._NARROWING.set(backfill._Narrowing("!r:x", JOIN_STATE))
        try:
            mine = defer.ensureDeferred(answer_for("!r:x", "$e"))
            other = defer.ensureDeferred(answer_for("!other:x", "$e"))
            self.assertIsNone(self.successResultOf(mine))
            self.assertEqual(self.successResultOf(other), "engine")
        finally:
            backfill._NARROWING.reset(token)
        self.assertEqual(asked, [("!r:x", "$e"), ("!other:x", "$e")])
