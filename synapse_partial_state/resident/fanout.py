"""The joiner's answer first, the room's fan-out after.

When a server joins a big room through us, Synapse stores the join, wakes its
federation sender (which sends the join to every other server in the room: a
transaction, and often a new TLS connection, per server; 2,000 of them in a
100,000-member room), and only then finishes the ``/send_join`` answer. In one
process these share one reactor, so the joiner waits for the fan-out: measured at
100,000 members (2,000 servers), 2.4 s of a 2.6 s ``/send_join`` was the sender's
work and the garbage collections it set off; the answer's own work was 0.3 s.

:class:`FanOutHold` lets the sender's wake-ups wait while answers are being
prepared, and passes the last one on once no answer is in progress, or at most
``max_hold_s`` after the first one held (so a wave of joiners cannot starve the
sender: it runs at least that often, and catches up on everything at once, as
its wake-ups only say "there is something new up to here"). Nothing is dropped:
the events are in the database, and the sender reads them from there.

A joiner's next request follows its ``/send_join`` answer at once: the state
its resync starts with (``/state_ids``, then ``/state``). The ``/send_join``
answer counts as in progress a moment after it is sent (``grace_s``), and the
state answers count too, so that the joiner's first state requests are answered
before the fan-out of its join takes the reactor (measured at 100,000 members:
``/state_ids``, built in 0.1 s from the cache, took 5 s behind the fan-out to
2,000 servers).
The same ``max_hold_s`` bounds it all.

Synapse's presence handler is held the same way (:meth:`FanOutHold.defer`):
woken by the same persisted join, it works out which servers to send presence
to from every member of the room, in one go on the reactor (measured at
100,000 members: 1.1 s of it, between the join being stored and the answer
being written, so that the answer then lost the race against the hold's
deadline and went out behind the fan-out: a 23 s ``/send_join``). Its wake-up
carries nothing (it reads the new state deltas itself), so the held one is
just called once on release.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: ``call_later(seconds, callback)`` returning something with ``cancel()``.
CallLater = Callable[[float, Callable[[], None]], Any]


class FanOutHold:
    """Holds the wake-ups ``wake(token)`` of Synapse's federation sender while
    at least one ``/send_join`` answer is in progress (see the module docstring).

    ``position(token)`` orders the tokens (the sender keeps the largest it was
    given, so handing it only the largest held one loses nothing)."""

    def __init__(
        self,
        wake: Callable[[Any], None],
        call_later: CallLater,
        max_hold_s: float,
        position: Callable[[Any], int],
    ) -> None:
        self._wake = wake
        self._call_later = call_later
        self._max_hold_s = max_hold_s
        self._position = position
        self._answers = 0
        self._held: Any = None
        #: wake-ups held since the last release, and when the first was
        self._held_count = 0
        self._held_since = 0.0
        self._deadline: Any = None
        #: other wake-ups held (:meth:`defer`), by name
        self._deferred: dict[str, Callable[[], None]] = {}
        #: Wake-ups held since start.
        self.held_total = 0
        #: Wake-ups passed on by the deadline while answers were in progress.
        self.deadline_releases = 0

    @property
    def answers_in_progress(self) -> int:
        return self._answers

    def notify(self, token: Any) -> None:
        """The sender's wake-up: passed on now, or held."""
        if not self._hold_one():
            self._wake(token)
            return
        if self._held is None or self._position(token) > self._position(self._held):
            self._held = token

    def defer(self, name: str, wake: Callable[[], None]) -> None:
        """Another wake-up that carries nothing (a second one named ``name``
        while held replaces the first): called now, or held with the sender's
        and called once on release."""
        if not self._hold_one():
            wake()
            return
        self._deferred[name] = wake

    def _hold_one(self) -> bool:
        """Whether a wake-up arriving now is held (answers are in progress);
        if so, it is counted and the deadline armed."""
        if self._answers == 0 or self._max_hold_s <= 0:
            return False
        self.held_total += 1
        self._held_count += 1
        if self._held is None and not self._deferred:
            self._held_since = time.monotonic()
        if self._deadline is None:
            self._deadline = self._call_later(self._max_hold_s, self._on_deadline)
        return True

    def answer_started(self) -> Callable[..., None]:
        """An answer is being prepared; call what this returns (once; later calls
        do nothing) when it has been sent, or has failed. Called with
        ``grace_s``, the answer counts as in progress that much longer: the
        request its client sends next (a joiner's ``/state_ids`` after its
        partial ``/send_join``) starts its own answer before the sender is
        woken."""
        self._answers += 1
        done = False

        def over() -> None:
            self._answers -= 1
            if self._answers == 0:
                self._release()

        def finished(grace_s: float = 0.0) -> None:
            nonlocal done
            if done:
                return
            done = True
            if grace_s > 0:
                self._call_later(grace_s, over)
            else:
                over()

        return finished

    def _on_deadline(self) -> None:
        self._deadline = None
        if self._held is not None or self._deferred:
            self.deadline_releases += 1
        self._release("its deadline")

    def _release(self, why: str = "the answers sent") -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        token, self._held = self._held, None
        deferred, self._deferred = self._deferred, {}
        if token is None and not deferred:
            return
        woken = (["Federation sender"] if token is not None else []) + list(deferred)
        logger.debug(
            "%s woken after %s: %d wake-up(s) held for %.0f ms",
            " and ".join(woken),
            why,
            self._held_count,
            (time.monotonic() - self._held_since) * 1000,
        )
        self._held_count = 0
        if token is not None:
            try:
                self._wake(token)
            except Exception:
                logger.exception("Waking the federation sender failed")
        for name, wake in deferred.items():
            try:
                wake()
            except Exception:
                logger.exception("Waking %s failed", name)
