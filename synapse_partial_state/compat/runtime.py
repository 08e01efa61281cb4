"""Synapse's async helpers and log-context rules, for code outside the compat layer.

Synapse's log contexts must be handed over correctly whenever a Deferred is waited
on or fired; these are its own helpers (``synapse.logging.context``,
``synapse.util.async_helpers``, ``synapse.util.iterutils``), named in one place.
"""

from __future__ import annotations

from typing import Any

from synapse.logging.context import PreserveLoggingContext, make_deferred_yieldable
from synapse.util.async_helpers import concurrently_execute, yieldable_gather_results
from synapse.util.iterutils import sorted_topologically

__all__ = [
    "PreserveLoggingContext",
    "concurrently_execute",
    "make_deferred_yieldable",
    "sorted_topologically",
    "wake_waiter",
    "yieldable_gather_results",
]


def wake_waiter(d: Any, value: object = None) -> None:
    """Fire a Deferred others wait on through ``make_deferred_yieldable`` without
    handing them this log context (Synapse's ``PreserveLoggingContext`` idiom)."""
    if not d.called:
        with PreserveLoggingContext():
            d.callback(value)
