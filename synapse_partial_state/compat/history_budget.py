"""A time budget for the foreground backfill of ``/messages`` during a resync.

``/messages`` backwards in a partial-state room backfills from the resident in
the foreground (:mod:`.partial_reads`, :mod:`.backfill`). The resident is busy
serving the resync (a big ``/state_ids``, ``/state``), may be slow or may hang
(Synapse's federation timeout is 60 s), and processing a hundred backfilled
events takes a while on its own, so the page could wait for seconds.

Within the budget (:data:`FOREGROUND_BACKFILL_BUDGET_S`) the page waits for the
backfill as stock does. Past it the backfill goes on in the background and the
page answers with the events this server has, with its ``end`` token: the
client paginates on from there and gets the backfilled history (Synapse queues
that request's own backfill behind this one, per room). The one case that
must not answer early is an empty page: without events, Synapse answers without
``end``, which tells the client it has reached the start of the room. So a page
that comes back empty (no ``end``) after its backfill was cut short waits for
that backfill and is computed again, without a budget.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import attr
from synapse.logging.context import make_deferred_yieldable
from synapse.util.async_helpers import ObservableDeferred

from synapse_partial_state.compat.runtime import TIMED_OUT, within

logger = logging.getLogger(__name__)

#: How long a ``/messages`` page waits for its foreground backfill during a
#: resync before answering with what is here (seconds; the default of
#: ``clients.history_wait_seconds``).
FOREGROUND_BACKFILL_BUDGET_S = 0.5


@attr.s(auto_attribs=True, slots=True)
class _Budget:
    seconds: float
    #: the backfill the page stopped waiting for, going on in the background
    behind: ObservableDeferred[Any] | None = None


_BUDGET: ContextVar[_Budget | None] = ContextVar("sps_history_budget", default=None)


@contextmanager
def _budget(seconds: float | None) -> Iterator[_Budget | None]:
    budget = None if seconds is None else _Budget(seconds)
    previous = _BUDGET.get()
    _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.set(previous)  # set, not reset: see partial_reads


async def page_within_budget(
    compute: Callable[[], Awaitable[Any]],
    budget_s: float | None = FOREGROUND_BACKFILL_BUDGET_S,
) -> Any:
    """A ``/messages`` page (``compute``: Synapse's ``get_messages``), its
    backfill waited for at most ``budget_s`` (``clients.history_wait_seconds``;
    None: as long as it takes; see :func:`backfill_within_budget`), unless the
    page comes back empty without ``end``."""
    if budget_s is None:
        return await compute()
    with _budget(budget_s) as budget:
        page = await compute()
    assert budget is not None
    if budget.behind is None or getattr(page, "end_token", True) is not None:
        return page
    # Empty, and its backfill cut short: that is not the start of the room.
    await make_deferred_yieldable(budget.behind.observe())
    with _budget(None):
        return await compute()


async def backfill_within_budget(
    handler: Any, room_id: str, backfill: Callable[[], Awaitable[bool]]
) -> bool:
    """Synapse's ``maybe_backfill`` (``backfill``, of ``handler``, Synapse's
    ``FederationHandler``), within the current page's budget if it has one:
    True/False as Synapse's; False once the budget is spent (the backfill goes
    on in the background)."""
    budget = _BUDGET.get()
    if budget is None:
        return await backfill()
    hs = handler.hs
    running = ObservableDeferred(
        hs.run_as_background_process("sps_history_backfill", backfill),
        consumeErrors=True,
    )
    # A failed backfill (Synapse logs it) counts as none: the page goes ahead.
    result = await within(running.observe(), budget.seconds, hs.get_reactor().callLater)
    if result is not TIMED_OUT:
        return bool(result)
    budget.behind = running
    logger.info(
        "/messages of partial-state room %s: backfill from the resident still "
        "running after %.1f s, answering with the events here (the backfill "
        "goes on)",
        room_id,
        budget.seconds,
    )
    return False
