"""A ``/state`` answer read as it arrives, kept as canonical JSON for the bulk checks.

Pure (ijson, canonicaljson and Synapse's event limits): the parser implements the
interface of Synapse's streaming HTTP body parsers (``CONTENT_TYPE``,
``MAX_RESPONSE_SIZE``, ``write``, ``finish``), and the compat layer hands it to
Synapse's client.

The answer comes from a server that may be hostile or broken, and the parser keeps
what it reads until the bulk check: what it keeps is bounded here.

* An item of ``pdus`` or ``auth_chain`` is kept only if it can be an event
  (:func:`plausible_pdu`: the fields every room version requires, of their JSON
  types) no bigger than Synapse's PDU limit (``MAX_PDU_SIZE``); the others are
  dropped and counted (:attr:`StatePdus.dropped`). An empty object, 3 bytes of
  the answer, was kept as 43 bytes of Python: 500 MiB of them cost 7 GiB.
* What is kept never adds up to more bytes than were received (numbers written
  short, ``1E15``, are kept long, ``1000000000000000.0``): an item that would
  outgrow them is dropped too. Honest answers never come near: their items'
  canonical JSON is no longer than what was sent.
* A body that is not JSON (an HTML error page, a truncated answer, a number
  beyond 64 bits, which ijson refuses) makes :meth:`StatePdusParser.write` or
  :meth:`StatePdusParser.finish` raise :class:`StateAnswerError`, a
  ``ValueError``: Synapse's HTTP client turns that into a failed request
  (``RequestSendFailed``, "Failed to parse response"), and the engine fails the
  destination over as for any other failed ``/state``.
* So does a body shaped as no answer of events can be, before ijson builds
  anything of it: nested deeper than :data:`MAX_NESTING`, map keys along one path
  longer than an event, an item made of more JSON values than
  :data:`MAX_ITEM_VALUES`. ijson keeps the path to every value it reads (as
  ``pdus.item.content...`` strings, one per level): 20,000 levels of ``[``, 40
  KB, cost it 1 GB, and 200,000 levels all the memory there is; a 9 MiB path of
  long keys, 1 GB. And it builds each item whole before the parser can drop
  it: an empty object, 3 bytes in the answer, is 72 in Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attr
from synapse.api.constants import MAX_PDU_SIZE, EventTypes

from synapse_partial_state.wire import MEMBERS_ONLY_PARAM

__all__ = [
    "MAX_ITEM_VALUES",
    "MAX_NESTING",
    "MAX_PDU_SIZE",
    "StateAnswerError",
    "StatePdus",
    "StatePdusParser",
    "plausible_pdu",
]


@attr.s(slots=True, auto_attribs=True)
class StatePdus:
    """A ``/state`` answer as federation JSON (not yet events): each pdu as its
    canonical JSON bytes, a fifth of the memory of the parsed dict."""

    pdus: list[bytes] = attr.Factory(list)
    auth_chain: list[bytes] = attr.Factory(list)
    #: The resident answered the members-only variant (MSC2775, unstable).
    members_only: bool = False
    #: Items of ``pdus`` and ``auth_chain`` left out: not events, or too big.
    dropped: int = 0


class StateAnswerError(ValueError):
    """The body is not a ``/state`` answer (not JSON at all, JSON ijson refuses,
    or shaped as no answer of events can be): the request fails."""


#: Deepest nesting of an answer's JSON: the answer, its list, and an event, which
#: Synapse reads no deeper than 127 levels (its JSON reader's limit), with room to
#: spare. The path ijson keeps stays small.
MAX_NESTING = 256
#: Most JSON values (each scalar, each start and end of an object or list) in one
#: item of ``pdus`` or ``auth_chain``: an event's canonical JSON spends a byte or
#: more on each, and Synapse stores none over ``MAX_PDU_SIZE`` bytes; four times
#: that leaves room for ``unsigned`` (which that limit does not count). ijson
#: builds an item whole: this bounds what one costs.
MAX_ITEM_VALUES = 4 * MAX_PDU_SIZE


#: Fields every PDU has in every room version (1-12), with their JSON types:
#: Synapse (its ``Event`` class, ``event_from_pdu_json``) refuses a pdu without
#: any of them, or with another type. ``room_id`` is checked apart (a version 12
#: create event has none: the room ID derives from it); ``event_id`` too (only
#: room versions 1 and 2 carry it).
_REQUIRED: tuple[tuple[str, type], ...] = (
    ("type", str),
    ("sender", str),
    ("content", dict),
    ("prev_events", list),
    ("auth_events", list),
    ("hashes", dict),
)
#: Integer fields of every PDU (a JSON boolean is not one).
_REQUIRED_INTS = ("depth", "origin_server_ts")


def plausible_pdu(item: Any, v1_event_ids: bool) -> bool:
    """Whether ``item`` (parsed JSON) can be an event: an object with the fields
    Synapse requires of a PDU in every room version, of their JSON types.

    Nothing Synapse accepts fails this: no field is required that some room
    version goes without, and ``signatures``, when present, must be an object
    (without it Synapse's own signature check decides). ``v1_event_ids``: the
    room version's events carry their ``event_id`` (versions 1 and 2)."""
    if not isinstance(item, dict):
        return False
    for field, kind in _REQUIRED:
        if not isinstance(item.get(field), kind):
            return False
    for field in _REQUIRED_INTS:
        if type(item.get(field)) is not int:
            return False
    if not isinstance(item.get("room_id"), str) and not (
        "room_id" not in item and item["type"] == EventTypes.Create
    ):
        return False
    if v1_event_ids and not isinstance(item.get("event_id"), str):
        return False
    return "signatures" not in item or isinstance(item["signatures"], dict)


class StatePdusParser:
    """Stream-parses a ``/state`` body with ijson as it arrives, like Synapse's
    ``_StateParser``, but keeps each pdu as canonical JSON for the bulk checks
    instead of building events one by one on the reactor thread, and only the
    items that can be events (see the module's docstring). ``on_pdu`` sees the
    dict of each item kept (e.g. to collect the signing keys it needs);
    ``v1_event_ids``: the room's events carry their ``event_id`` (room versions
    1 and 2)."""

    CONTENT_TYPE = "application/json"
    MAX_RESPONSE_SIZE = 500 * 1024 * 1024  # as Synapse's /state parser

    def __init__(
        self,
        on_pdu: Callable[[dict[str, Any]], None] | None,
        v1_event_ids: bool = False,
    ) -> None:
        import ijson

        self._result = StatePdus()
        self._on_pdu = on_pdu
        self._v1_event_ids = v1_event_ids
        #: bytes of the body received, and of the canonical JSON kept
        self._received = 0
        self._kept = 0
        self._coros = [
            # first: it sees each piece of the body before ijson builds any of it
            ijson.basic_parse_coro(self._guard(), use_float=True),
            ijson.items_coro(
                self._collect(self._result.pdus), "pdus.item", use_float=True
            ),
            ijson.items_coro(
                self._collect(self._result.auth_chain),
                "auth_chain.item",
                use_float=True,
            ),
        ]

    def _collect(self, out: list[bytes]) -> Any:
        import ijson

        @ijson.coroutine  # type: ignore[misc]
        def sink() -> Any:
            while True:
                value = yield
                encoded = self._encoded(value)
                if encoded is None:
                    self._result.dropped += 1
                    continue
                if self._on_pdu is not None:
                    self._on_pdu(value)
                self._kept += len(encoded)
                out.append(encoded)

        return sink()

    def _encoded(self, value: Any) -> bytes | None:
        """``value``'s canonical JSON if it is kept, else None."""
        from canonicaljson import encode_canonical_json

        if not plausible_pdu(value, self._v1_event_ids):
            return None
        try:
            encoded = encode_canonical_json(value)
        except Exception:
            return None  # not JSON an event can be made of (e.g. nested too deep)
        if len(encoded) > MAX_PDU_SIZE and _pdu_size(value) > MAX_PDU_SIZE:
            return None
        if self._kept + len(encoded) > self._received:
            return None
        return encoded

    def _guard(self) -> Any:
        """Reads the body's JSON values as they come (ijson's basic parser keeps
        no path), refusing a shape no answer of events can have (see the module's
        docstring), and reads the members-only marker (a top-level ``true``)."""
        import ijson

        result = self._result

        @ijson.coroutine  # type: ignore[misc]
        def sink() -> Any:
            depth = 0
            #: length of the current key at each open level (0 in lists)
            key_lengths: list[int] = []
            keys_on_path = 0
            #: the current top-level key; inside a list of items; values of the
            #: current item; the next value is the members-only marker's
            top_key: str | None = None
            in_items = False
            item_values = 0
            marker_next = False
            while True:
                event, value = yield
                was_inside = depth >= 3  # inside an item, if in a list of them
                if marker_next:
                    result.members_only = event == "boolean" and value is True
                    marker_next = False
                if event == "map_key":
                    keys_on_path += len(value) - key_lengths[-1]
                    key_lengths[-1] = len(value)
                    if keys_on_path > MAX_PDU_SIZE:
                        raise StateAnswerError(
                            f"/state answer with keys over {MAX_PDU_SIZE} "
                            "characters on one path"
                        )
                    if depth == 1:
                        top_key = value
                        marker_next = value == MEMBERS_ONLY_PARAM
                elif event == "start_map" or event == "start_array":
                    depth += 1
                    key_lengths.append(0)
                    if depth > MAX_NESTING:
                        raise StateAnswerError(
                            f"/state answer nested over {MAX_NESTING} levels deep"
                        )
                    if depth == 2:
                        in_items = event == "start_array" and top_key in _ITEM_LISTS
                    elif depth == 3:
                        item_values = 0
                elif event == "end_map" or event == "end_array":
                    depth -= 1
                    keys_on_path -= key_lengths.pop()
                if in_items and (was_inside or depth >= 3):
                    item_values += 1
                    if item_values > MAX_ITEM_VALUES:
                        raise StateAnswerError(
                            f"/state answer with an item of over {MAX_ITEM_VALUES} "
                            "JSON values"
                        )

        return sink()

    def write(self, data: bytes) -> int:
        if not data:
            return 0  # ijson would take it for the end of the body
        self._received += len(data)
        for coro in self._coros:
            _send(coro, data)
        return len(data)

    def finish(self) -> StatePdus:
        error: StateAnswerError | None = None
        for coro in self._coros:
            try:
                _send(coro, None)
            except StateAnswerError as e:
                error = error or e
        if error is not None:
            raise error
        return self._result


#: The answer's lists of items (ijson builds each of their items).
_ITEM_LISTS = ("pdus", "auth_chain")


def _send(coro: Any, data: bytes | None) -> None:
    """``data`` to one of ijson's parsers (None: the end of the body), its errors
    as :class:`StateAnswerError`."""
    import ijson

    try:
        if data is None:
            coro.close()
        else:
            coro.send(data)
    except (ijson.JSONError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StateAnswerError(f"not a JSON /state answer: {reason}") from e


def _pdu_size(pdu: dict[str, Any]) -> int:
    """The size Synapse's limit applies to, at most: the canonical JSON without
    ``unsigned`` (which Synapse mostly strips before measuring; what it keeps of
    it may only make the event bigger)."""
    from canonicaljson import encode_canonical_json

    return len(encode_canonical_json({k: v for k, v in pdu.items() if k != "unsigned"}))
