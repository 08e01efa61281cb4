"""``/state`` and ``/state_ids`` requests counted as answers in progress for the
fan-out hold from their arrival until their response has been written
(``compat/servlets.request_aware_servlet`` with a tracker)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.compat import servlets
from synapse_partial_state.compat.servlets import request_aware_servlet


class _Request:
    def __init__(self) -> None:
        self.finished = False
        self.notified: list[defer.Deferred[None]] = []

    def notifyFinish(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.notified.append(d)
        return d

    def finish(self) -> None:
        self.finished = True
        for d in self.notified:
            d.callback(None)


class _NativeServlet:
    """``BaseFederationServlet``'s shape: ``_wrap(func)`` gives the function the
    resource calls with the request; here it 'checks the signature' (records
    it) and calls ``func``."""

    def __init__(self, events: list[str], handler: Any) -> None:
        self.events = events
        self.handler = handler

    def _wrap(self, func: Any) -> Any:
        async def new_func(request: Any) -> Any:
            self.events.append("signature checked")
            return await func(request)

        return new_func


class RequestTrackingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events: list[str] = []

        def answer_started() -> Any:
            self.events.append("started")
            return lambda grace_s=0.0: self.events.append(
                f"finished+{grace_s}" if grace_s else "finished"
            )

        self.answer_started = answer_started

    def call(self, handler: Any, grace_s: float = 0.0, track: bool = True) -> Any:
        cls = request_aware_servlet(
            _NativeServlet, self.answer_started if track else None, grace_s
        )
        servlet = cls(self.events, handler)
        self.assertEqual(cls.__name__, "_NativeServlet")
        request = _Request()

        async def func(req: Any) -> Any:
            self.assertIs(servlets.FEDERATION_REQUEST.get(), req)
            return await handler(req)

        d = defer.ensureDeferred(servlet._wrap(func)(request))
        return request, d

    def test_counted_from_arrival_until_the_response_is_written(self) -> None:
        async def handler(request: Any) -> None:
            self.events.append("serving")

        request, d = self.call(handler, grace_s=2.0)
        self.successResultOf(d)
        self.assertEqual(self.events, ["started", "signature checked", "serving"])
        request.finish()
        self.assertEqual(self.events[-1], "finished+2.0")
        self.assertIsNone(servlets.FEDERATION_REQUEST.get())

    def test_a_response_written_before_the_handler_returns_ends_it_at_once(
        self,
    ) -> None:
        async def handler(request: Any) -> None:
            request.finish()  # a small answer written in one go

        _, d = self.call(handler)
        self.successResultOf(d)
        self.assertEqual(self.events, ["started", "signature checked", "finished"])

    def test_a_failure_ends_it_once_the_error_is_written(self) -> None:
        async def handler(request: Any) -> None:
            raise RuntimeError("no such event")

        request, d = self.call(handler)
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.events, ["started", "signature checked"])
        request.finish()  # Synapse writes the error
        self.assertEqual(self.events[-1], "finished")

    def test_without_a_tracker_nothing_is_counted(self) -> None:
        async def handler(request: Any) -> None:
            self.events.append("serving")

        request, d = self.call(handler, track=False)
        self.successResultOf(d)
        request.finish()
        self.assertEqual(self.events, ["signature checked", "serving"])
