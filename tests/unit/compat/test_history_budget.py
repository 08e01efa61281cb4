"""The foreground backfill's time budget (``compat/history_budget.py``), with
Synapse's page and backfill faked."""

from __future__ import annotations

from typing import Any

import attr
from twisted.internet import defer, task
from twisted.trial import unittest

from synapse_partial_state.compat import history_budget
from synapse_partial_state.compat.history_budget import (
    backfill_within_budget,
    page_within_budget,
)

BUDGET = history_budget.FOREGROUND_BACKFILL_BUDGET_S


class FakeHs:
    """Synapse's ``FederationHandler`` (its ``hs``) and ``HomeServer``."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.hs = self

    def get_reactor(self) -> task.Clock:
        return self.clock

    def run_as_background_process(self, desc: str, func: Any) -> defer.Deferred[Any]:
        """As Synapse's: the function's result, None (logged) if it raises."""
        running = defer.ensureDeferred(func())
        self.failures: list[Any] = []
        return running.addErrback(lambda f: self.failures.append(f))


@attr.s(auto_attribs=True)
class Page:
    end_token: str | None


class Room:
    """A room whose backfill takes until :meth:`finish`, and whose page has
    ``here`` events (``end_token`` None when there are none, as Synapse)."""

    def __init__(self, hs: FakeHs, here: int) -> None:
        self.hs = hs
        self.here = here
        self.backfills = 0
        self.pages = 0
        self.held: defer.Deferred[None] = defer.Deferred()

    async def backfill(self) -> bool:
        self.backfills += 1
        await self.held
        self.here += 100
        return True

    async def page(self) -> Page:
        self.pages += 1
        await backfill_within_budget(self.hs, "!r:x", self.backfill)
        return Page("t-end" if self.here else None)

    def finish(self) -> None:
        self.held.callback(None)


class BudgetTests(unittest.TestCase):
    def setUp(self) -> None:
        self.hs = FakeHs()

    def test_a_backfill_within_the_budget_is_waited_for(self) -> None:
        room = Room(self.hs, here=1)
        got = defer.ensureDeferred(page_within_budget(room.page))
        self.hs.clock.advance(BUDGET / 2)
        self.assertNoResult(got)
        room.finish()
        self.assertEqual(self.successResultOf(got), Page("t-end"))
        self.assertEqual((room.pages, room.backfills, room.here), (1, 1, 101))
        self.assertEqual(self.hs.clock.getDelayedCalls(), [])

    def test_past_the_budget_the_page_answers_and_the_backfill_goes_on(
        self,
    ) -> None:
        room = Room(self.hs, here=2)
        got = defer.ensureDeferred(page_within_budget(room.page))
        with self.assertLogs(history_budget.logger, "INFO"):
            self.hs.clock.advance(BUDGET + 0.01)
        self.assertEqual(self.successResultOf(got), Page("t-end"))
        self.assertEqual(room.here, 2)  # answered with what is here
        room.finish()
        self.assertEqual(room.here, 102)  # the backfill went on
        self.assertEqual(room.backfills, 1)

    def test_an_empty_page_waits_for_its_backfill_and_is_computed_again(
        self,
    ) -> None:
        """Never an empty page without ``end`` (the start of the room, to a
        client) while the backfill is still running."""
        room = Room(self.hs, here=0)
        got = defer.ensureDeferred(page_within_budget(room.page))
        with self.assertLogs(history_budget.logger, "INFO"):
            self.hs.clock.advance(BUDGET * 10)
        self.assertNoResult(got)
        room.held, held = defer.succeed(None), room.held  # the next one is quick
        held.callback(None)
        self.assertEqual(self.successResultOf(got), Page("t-end"))
        self.assertEqual(room.pages, 2)

    def test_a_failed_backfill_counts_as_no_backfill(self) -> None:
        async def failing() -> bool:
            raise RuntimeError("resident gone")

        async def page() -> Page:
            did = await backfill_within_budget(self.hs, "!r:x", failing)
            self.assertFalse(did)
            return Page("t-end")

        self.assertEqual(
            self.successResultOf(defer.ensureDeferred(page_within_budget(page))),
            Page("t-end"),
        )
        self.flushLoggedErrors(RuntimeError)

    def test_without_a_page_budget_the_backfill_is_awaited(self) -> None:
        room = Room(self.hs, here=0)
        got = defer.ensureDeferred(
            backfill_within_budget(self.hs, "!r:x", room.backfill)
        )
        self.hs.clock.advance(BUDGET * 10)
        self.assertNoResult(got)
        room.finish()
        self.assertIs(self.successResultOf(got), True)
