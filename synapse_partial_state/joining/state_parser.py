"""A ``/state`` answer read as it arrives, kept as canonical JSON for the bulk checks.

Pure (ijson and canonicaljson only): the parser implements the interface of
Synapse's streaming HTTP body parsers (``CONTENT_TYPE``, ``MAX_RESPONSE_SIZE``,
``write``, ``finish``), and the compat layer hands it to Synapse's client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attr

from synapse_partial_state.wire import MEMBERS_ONLY_PARAM


@attr.s(slots=True, auto_attribs=True)
class StatePdus:
    """A ``/state`` answer as federation JSON (not yet events): each pdu as its
    canonical JSON bytes, a fifth of the memory of the parsed dict."""

    pdus: list[bytes] = attr.Factory(list)
    auth_chain: list[bytes] = attr.Factory(list)
    #: The resident answered the members-only variant (MSC2775, unstable).
    members_only: bool = False


class StatePdusParser:
    """Stream-parses a ``/state`` body with ijson as it arrives, like Synapse's
    ``_StateParser``, but keeps each pdu as canonical JSON for the bulk checks
    instead of building events one by one on the reactor thread. ``on_pdu`` sees
    each pdu's dict first (e.g. to collect the signing keys it needs)."""

    CONTENT_TYPE = "application/json"
    MAX_RESPONSE_SIZE = 500 * 1024 * 1024  # as Synapse's /state parser

    def __init__(self, on_pdu: Callable[[dict[str, Any]], None] | None) -> None:
        import ijson

        self._result = StatePdus()
        self._on_pdu = on_pdu
        self._coros = [
            ijson.items_coro(
                self._collect(self._result.pdus), "pdus.item", use_float=True
            ),
            ijson.items_coro(
                self._collect(self._result.auth_chain),
                "auth_chain.item",
                use_float=True,
            ),
            ijson.items_coro(self._marker(), MEMBERS_ONLY_PARAM, use_float=True),
        ]

    def _collect(self, out: list[bytes]) -> Any:
        import ijson
        from canonicaljson import encode_canonical_json

        on_pdu = self._on_pdu

        @ijson.coroutine  # type: ignore[misc]
        def sink() -> Any:
            while True:
                value = yield
                if not isinstance(value, dict):
                    continue
                if on_pdu is not None:
                    on_pdu(value)
                try:
                    out.append(encode_canonical_json(value))
                except Exception:
                    continue  # not JSON an event can be made of: leave it out

        return sink()

    def _marker(self) -> Any:
        import ijson

        result = self._result

        @ijson.coroutine  # type: ignore[misc]
        def sink() -> Any:
            while True:
                value = yield
                result.members_only = value is True

        return sink()

    def write(self, data: bytes) -> int:
        for coro in self._coros:
            coro.send(data)
        return len(data)

    def finish(self) -> StatePdus:
        for coro in self._coros:
            coro.close()
        return self._result
