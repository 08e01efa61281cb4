"""The join's signing-key prefetch (``joining/keys.py`` ``JoinKeyPrefetch``):
what it fetches from a resident's hint, and how long Synapse's check of the
``/send_join`` answer waits for it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from synapse_partial_state.compat.keyfetch import KeyFetchOutcome
from synapse_partial_state.joining.keys import (
    JOIN_KEY_MAX_SERVERS,
    JOIN_KEY_WAIT_S,
    JoinKeyPrefetch,
)

ROOM = "!r:x"


class _Api:
    server_name = "me.org"

    def run_as_background_process(self, desc: str, f: Any) -> defer.Deferred[Any]:
        return defer.ensureDeferred(f())


class _Ops:
    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.asked: list[list[str]] = []
        self.fetching: defer.Deferred[KeyFetchOutcome] = defer.Deferred()

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def call_later(self, delay_s: float, callback: Any) -> Any:
        return self.clock.callLater(delay_s, callback)

    async def prefetch_server_keys(
        self, servers: Iterable[str], concurrency: int
    ) -> KeyFetchOutcome:
        self.asked.append(list(servers))
        return await self.fetching


class JoinKeyPrefetchTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.ops = _Ops(self.clock)
        self.stored = {"stored.org"}

        async def stored_keys(servers: Iterable[str], at_ms: int) -> set[str]:
            return {s for s in servers if s in self.stored}

        self.prefetch = JoinKeyPrefetch(_Api(), self.ops, stored_keys)  # type: ignore[arg-type]

    def check(self) -> defer.Deferred[bool]:
        return defer.ensureDeferred(self.prefetch.wait(ROOM, JOIN_KEY_WAIT_S))

    def test_fetches_the_hinted_servers_but_ours_and_those_stored(self) -> None:
        self.prefetch.on_hint(ROOM, ["a.org", "me.org", "stored.org", "b.org"])
        self.assertEqual(self.ops.asked, [["a.org", "b.org"]])

    def test_only_the_first_servers_of_the_hint_are_fetched(self) -> None:
        hint = [f"s{i}.org" for i in range(JOIN_KEY_MAX_SERVERS + 10)]
        self.prefetch.on_hint(ROOM, ["stored.org", *hint])
        self.assertEqual(self.ops.asked, [hint[:JOIN_KEY_MAX_SERVERS]])

    def test_the_check_waits_for_the_prefetch(self) -> None:
        self.prefetch.on_hint(ROOM, ["a.org"])
        checked = self.check()
        self.assertNoResult(checked)
        self.clock.advance(JOIN_KEY_WAIT_S / 2)
        self.assertNoResult(checked)
        self.ops.fetching.callback(KeyFetchOutcome(direct=1))
        self.successResultOf(checked)

    def test_the_check_waits_at_most_join_key_wait_s(self) -> None:
        self.prefetch.on_hint(ROOM, ["dead.org"])
        checked = self.check()
        self.clock.advance(JOIN_KEY_WAIT_S - 0.1)
        self.assertNoResult(checked)
        self.clock.advance(0.2)
        self.successResultOf(checked)

    def test_without_a_hint_the_check_goes_on_at_once(self) -> None:
        self.successResultOf(self.check())
        self.prefetch.on_hint("!other:x", ["a.org"])
        self.successResultOf(self.check())

    def test_a_hint_naming_only_us_fetches_nothing(self) -> None:
        self.prefetch.on_hint(ROOM, ["me.org"])
        self.assertEqual(self.ops.asked, [])
        self.successResultOf(self.check())

    def wait(self, seconds: float) -> defer.Deferred[bool]:
        return defer.ensureDeferred(self.prefetch.wait(ROOM, seconds))

    def test_a_short_wait_says_the_prefetch_goes_on(self) -> None:
        self.prefetch.on_hint(ROOM, ["slow.org"])
        first = self.wait(0.25)
        self.clock.advance(0.3)
        self.assertIs(self.successResultOf(first), False)
        # A second wait goes on where the first stopped...
        second = self.wait(JOIN_KEY_WAIT_S)
        self.clock.advance(1)
        self.ops.fetching.callback(KeyFetchOutcome(direct=1))
        self.assertIs(self.successResultOf(second), True)
        # ...and once the prefetch is over, there is nothing to wait for.
        self.assertIs(self.successResultOf(self.wait(1)), True)

    def test_the_waits_share_join_key_wait_s(self) -> None:
        self.prefetch.on_hint(ROOM, ["dead.org"])
        first = self.wait(1)
        self.clock.advance(1)
        self.assertIs(self.successResultOf(first), False)
        second = self.wait(JOIN_KEY_WAIT_S)
        self.clock.advance(JOIN_KEY_WAIT_S - 1 - 0.1)
        self.assertNoResult(second)
        self.clock.advance(0.2)
        self.assertIs(self.successResultOf(second), False)
        # The wait is over for good: Synapse's own check fetches the rest.
        self.assertIs(self.successResultOf(self.wait(1)), True)
