"""``/state`` and ``/state_ids`` answers counted as in progress for the fan-out
hold until their response has been written (``compat/servlets.while_answering``)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.compat import servlets
from synapse_partial_state.compat.servlets import StateQuery, while_answering

QUERY = StateQuery(origin="a.test", room_id="!r:a", event_id="$e")


class _Request:
    def __init__(self) -> None:
        self.finished: defer.Deferred[None] = defer.Deferred()

    def notifyFinish(self) -> defer.Deferred[None]:
        return self.finished


class WhileAnsweringTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events: list[str] = []

        def answer_started() -> Any:
            self.events.append("started")
            return lambda grace_s=0.0: self.events.append(
                f"finished+{grace_s}" if grace_s else "finished"
            )

        self.answer_started = answer_started

    def serve(self, serve: Any, grace_s: float = 0.0) -> tuple[_Request, Any]:
        request = _Request()
        token = servlets.FEDERATION_REQUEST.set(request)  # type: ignore[arg-type]
        try:
            tracked = while_answering(serve, self.answer_started, grace_s)
            d: Any = defer.ensureDeferred(tracked(request, QUERY))  # type: ignore[arg-type]
        finally:
            servlets.FEDERATION_REQUEST.reset(token)
        return request, d

    def test_in_progress_until_the_response_is_written(self) -> None:
        async def serve(request: Any, query: StateQuery) -> bool:
            self.events.append("serving")
            return True

        request, d = self.serve(serve)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.events, ["started", "serving"])
        request.finished.callback(None)
        self.assertEqual(self.events, ["started", "serving", "finished"])

    def test_declined_stock_answers_in_the_same_request(self) -> None:
        async def serve(request: Any, query: StateQuery) -> bool:
            return False

        request, d = self.serve(serve)
        self.assertFalse(self.successResultOf(d))
        self.assertEqual(self.events, ["started"])
        request.finished.callback(None)
        self.assertEqual(self.events, ["started", "finished"])

    def test_a_failure_ends_it_at_once(self) -> None:
        async def serve(request: Any, query: StateQuery) -> bool:
            raise RuntimeError("no such event")

        _, d = self.serve(serve)
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.events, ["started", "finished"])

    def test_with_a_grace_once_written(self) -> None:
        async def serve(request: Any, query: StateQuery) -> bool:
            return True

        request, d = self.serve(serve, grace_s=2.0)
        self.successResultOf(d)
        self.assertEqual(self.events, ["started"])
        request.finished.callback(None)
        self.assertEqual(self.events, ["started", "finished+2.0"])
