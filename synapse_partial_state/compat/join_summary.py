"""The joining side's read of the resident's MSC2775 summary
(``org.matrix.msc2775.summary``: heroes, joined and invited counts) in a
``/send_join`` answer.

Synapse (1.163.2) parses ``/send_join`` answers as they stream in
(``synapse.federation.transport.client.SendJoinParser``: one ijson coroutine per
field it knows) and drops the fields it does not know. The module adds one
coroutine for the summary field to each v2 parser (``__init__``), and once the
answer is whole (``finish``) hands the raw block, with the room and the join
event, to ``on_summary`` (which stores it in the background: the join does not
wait for it). The summary block is small; its coroutine only collects that
field as the parser's own ones do theirs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Generator
from typing import Any

from synapse_partial_state.compat.patching import wrap_instance_method
from synapse_partial_state.wire import SUMMARY_FIELD

logger = logging.getLogger(__name__)

#: (room ID, join event ID, the raw summary block) -> None; must not block.
OnSummary = Callable[[str, str, Any], None]

_ON_SUMMARY: list[OnSummary] = []


def _collector(into: list[Any]) -> Generator[None, Any, None]:
    """For ``ijson.items_coro``: keeps every item of the prefix."""
    while True:
        into.append((yield))


def _wrap_init(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    def __init__(self: Any, room_version: Any, v1_api: bool) -> None:
        native(self, room_version, v1_api)
        self._sps_summary = []
        if v1_api:
            return  # a v1 answer is [200, {...}]: partial joins use v2
        import ijson

        collector = _collector(self._sps_summary)
        next(collector)  # primed: the C backend sends to it at once
        self._coros.append(ijson.items_coro(collector, SUMMARY_FIELD, use_float=True))

    return __init__


def _wrap_finish(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    def finish(self: Any) -> Any:
        response = native(self)
        found = getattr(self, "_sps_summary", None)
        event = getattr(response, "event", None)
        if found and event is not None and _ON_SUMMARY:
            try:
                _ON_SUMMARY[0](event.room_id, event.event_id, found[0])
            except Exception:  # never fail a join for its summary
                logger.exception("Could not keep the summary of %s", event.room_id)
        return response

    return finish


def install_join_summary_capture(on_summary: OnSummary) -> None:
    """Hand each partial ``/send_join`` answer's summary block to
    ``on_summary``; installing again replaces it."""
    from synapse.federation.transport.client import SendJoinParser

    _ON_SUMMARY[:] = [on_summary]
    for name, wrap, why in (
        (
            "__init__",
            _wrap_init,
            "also collect the org.matrix.msc2775.summary field of /send_join",
        ),
        (
            "finish",
            _wrap_finish,
            "hand the resident's summary to the module (stored in the background)",
        ),
    ):
        target = f"synapse.federation.transport.client.SendJoinParser.{name}"
        wrap_instance_method(SendJoinParser, name, wrap, target, why, kind="wrap")
