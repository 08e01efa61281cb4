"""The module's federation seams on any request (hypothesis).

``/state`` and ``/state_ids`` servlets: whatever query string a server sends, the
module's servlet parses ``event_id`` as stock's servlet does: the same error
(status, errcode, message) where stock refuses, and otherwise the module serves
(or declines to stock) the very ``event_id`` stock would have used. The one extra
refusal is of the module's own ``org.matrix.msc2775.members_only`` parameter on
``/state``, as Synapse refuses its own booleans (400 ``M_INVALID_PARAM``).
Synapse's native servlet is faked: only ``on_GET`` is called.

``/send_join``: what the module adds to an accepted partial answer reads the
join's ``state_key`` and ``prev_events`` defensively, whatever they hold.
"""

from __future__ import annotations

import unittest
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from synapse.api.errors import Codes, SynapseError
from synapse.http.servlet import parse_string_from_args

from synapse_partial_state.compat import send_join, servlets
from synapse_partial_state.compat.servlets import StateQuery
from synapse_partial_state.wire import MEMBERS_ONLY_PARAM
from tests.unit.sync_run import run

MEMBERS_ONLY = MEMBERS_ONLY_PARAM.encode()

#: Query values: valid, junk, non-ASCII, not UTF-8, empty.
values = st.sampled_from(
    [b"$e:x", b"", b"true", b"false", b"yes", b"TRUE", "é".encode(), b"\xff", b"\x00"]
) | st.binary(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner)
    ),
    max_leaves=10,
)
queries = st.dictionaries(
    st.sampled_from([b"event_id", MEMBERS_ONLY, b"foo", b"event_id[]"]),
    st.lists(values, min_size=1, max_size=3),
    max_size=4,
)


class _NativeServlet:
    """Stands in for Synapse's servlet class: records what reaches its ``on_GET``."""

    def __init__(self) -> None:
        self.native_calls: list[tuple[Any, ...]] = []

    async def on_GET(
        self, origin: str, content: None, query: dict[bytes, list[bytes]], room_id: str
    ) -> tuple[int, Any]:
        self.native_calls.append((origin, content, query, room_id))
        return 200, "native"


def _error(e: SynapseError) -> tuple[int, str, str]:
    return e.code, e.errcode, e.msg


class StateServletQueryProperties(unittest.TestCase):
    def outcome(
        self,
        members_only_variant: bool,
        query: dict[bytes, list[bytes]],
        serves: bool,
    ) -> tuple[Any, list[StateQuery], _NativeServlet]:
        """The module servlet's result (or SynapseError) for ``query``, what it
        asked the module to serve, and the native servlet."""
        served: list[StateQuery] = []

        async def serve(request: Any, state_query: StateQuery) -> bool:
            served.append(state_query)
            return serves

        servlet = servlets._module_state_servlet(
            _NativeServlet, serve, members_only_variant, None, 0.0
        )()
        token = servlets.FEDERATION_REQUEST.set(object())  # type: ignore[arg-type]
        try:
            result: Any = run(servlet.on_GET("origin:x", None, query, "!r:x"))
        except SynapseError as e:
            result = e
        finally:
            servlets.FEDERATION_REQUEST.reset(token)
        return result, served, servlet

    @settings(max_examples=300, deadline=None)
    @given(queries, st.booleans(), st.booleans())
    def test_event_id_is_parsed_as_stock_parses_it(
        self, query: dict[bytes, list[bytes]], members_only_variant: bool, serves: bool
    ) -> None:
        try:
            stock: Any = parse_string_from_args(query, "event_id", None, required=True)
        except SynapseError as e:
            stock = e
        result, served, servlet = self.outcome(members_only_variant, query, serves)
        if isinstance(stock, SynapseError):
            # Stock's refusal, word for word; nothing served.
            self.assertIsInstance(result, SynapseError)
            self.assertEqual(_error(result), _error(stock))
            self.assertEqual((served, servlet.native_calls), ([], []))
            return
        raw = query.get(MEMBERS_ONLY, [b"false"])[0]
        if members_only_variant and raw not in (b"true", b"false"):
            # Ours: the module's own parameter, refused as Synapse refuses its own.
            self.assertIsInstance(result, SynapseError)
            self.assertEqual((result.code, result.errcode), (400, Codes.INVALID_PARAM))
            self.assertEqual((served, servlet.native_calls), ([], []))
            return
        expected = StateQuery(
            "origin:x", "!r:x", stock, members_only_variant and raw == b"true"
        )
        self.assertEqual(served, [expected])
        if serves:
            # Written by the module ("already handled").
            self.assertIsNone(result)
            self.assertEqual(servlet.native_calls, [])
        else:
            # Declined: stock's servlet answers the very same request.
            self.assertEqual(result, (200, "native"))
            self.assertEqual(servlet.native_calls, [("origin:x", None, query, "!r:x")])


class PartialAnswerProperties(unittest.TestCase):
    def setUp(self) -> None:
        hooks = send_join._SEND_JOIN_HOOKS
        saved = (hooks.extras_provider, hooks.decorate_response, hooks.observer)

        def restore() -> None:
            (hooks.extras_provider, hooks.decorate_response, hooks.observer) = saved

        self.addCleanup(restore)

    @settings(max_examples=200, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(["state_key", "prev_events", "room_id"]), json_values
        )
    )
    def test_any_join_content_is_read_safely(self, content: dict[str, Any]) -> None:
        """The summary is asked for the joiner only when ``state_key`` is a
        string; the observer gets the string ``prev_events`` only."""
        calls: list[tuple[Any, ...]] = []

        async def decorate(room_id: str, joiner: str) -> dict[str, Any]:
            calls.append(("decorate", joiner))
            return {"summary": 1}

        def observer(room_id: str, prev_events: list[str]) -> None:
            calls.append(("observer", prev_events))

        hooks = send_join._SEND_JOIN_HOOKS
        hooks.decorate_response, hooks.observer = decorate, observer
        resp: dict[str, Any] = {"members_omitted": True}
        run(send_join._after_partial_answer(resp, content, "!r:x"))
        joiner = content.get("state_key")
        prev = content.get("prev_events")
        expected: list[tuple[Any, ...]] = []
        if isinstance(joiner, str):
            expected.append(("decorate", joiner))
        expected.append(
            (
                "observer",
                [e for e in prev if isinstance(e, str)]
                if isinstance(prev, list)
                else [],
            )
        )
        self.assertEqual(calls, expected)
        self.assertEqual(resp.get("summary"), 1 if isinstance(joiner, str) else None)
