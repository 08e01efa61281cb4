"""Synapse's async helpers and log-context rules, for code outside the compat layer.

Synapse's log contexts must be handed over correctly whenever a Deferred is waited
on or fired; these are its own helpers (``synapse.logging.context``,
``synapse.util.async_helpers``, ``synapse.util.iterutils``), named in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from synapse.logging.context import PreserveLoggingContext, make_deferred_yieldable
from synapse.util.async_helpers import concurrently_execute, yieldable_gather_results
from synapse.util.iterutils import sorted_topologically

__all__ = [
    "TIMED_OUT",
    "PreserveLoggingContext",
    "call_later_s",
    "concurrently_execute",
    "make_deferred_yieldable",
    "sorted_topologically",
    "wake_waiter",
    "within",
    "yieldable_gather_results",
]


def wake_waiter(d: Any, value: object = None) -> None:
    """Fire a Deferred others wait on through ``make_deferred_yieldable`` without
    handing them this log context (Synapse's ``PreserveLoggingContext`` idiom)."""
    if not d.called:
        with PreserveLoggingContext():
            d.callback(value)


def call_later_s(clock: Any, delay_s: float, callback: Callable[[], object]) -> Any:
    """Synapse's clock ``call_later`` in seconds (it takes a ``Duration`` since
    1.144); returns the delayed call (``cancel()``, ``active()``)."""
    from synapse.util.duration import Duration

    return clock.call_later(Duration(milliseconds=delay_s * 1000), callback)


#: What :func:`within` returns when the time ran out.
TIMED_OUT = object()


async def within(
    d: Any, seconds: float, call_later: Callable[[float, Callable[[], object]], Any]
) -> Any:
    """``d``'s result (None if it failed), or :data:`TIMED_OUT` after
    ``seconds`` (``call_later``: the reactor's or Synapse clock's). ``d`` keeps
    its result for its other callbacks; it is not cancelled."""
    from twisted.internet import defer
    from twisted.python.failure import Failure

    waiter: defer.Deferred[Any] = defer.Deferred()

    def passthrough(result: object) -> object:
        wake_waiter(waiter, None if isinstance(result, Failure) else result)
        return result

    d.addBoth(passthrough)
    call = call_later(seconds, lambda: wake_waiter(waiter, TIMED_OUT))
    try:
        return await make_deferred_yieldable(waiter)
    finally:
        if call.active():
            call.cancel()
