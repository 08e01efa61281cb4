"""Answers that arrive slowly, cut short or malformed (behaviours ``trickle``,
``truncate`` and ``malformed``), for fault tests of a joiner's resync.

Each takes the answer the fake server would have given (status 200) and
delivers or rewrites it:

* ``trickle``: the whole answer, one byte a second, while the rule is in place
  (at most its ``seconds`` when > 0), then the rest at once: a resident that
  keeps the connection busy without ever finishing;
* ``truncate``: the first half of the answer under the full ``Content-Length``,
  then the connection is closed: an answer cut short in transit;
* ``malformed``: a complete HTTP answer whose body is not what was asked for,
  ``invalid_json`` (the first half of the JSON) or ``wrong_shape`` (valid JSON,
  but every top-level list holds numbers instead of events or event IDs).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.task import deferLater
from twisted.web.server import Request

from .behaviour import Behaviour

#: Seconds between two bytes of a trickled answer.
TRICKLE_INTERVAL_S = 1.0


def malformed(body: bytes, mode: str) -> bytes:
    """``body`` (a JSON answer) made malformed the ``mode`` way."""
    if mode == "invalid_json":
        return body[: max(1, len(body) // 2)]
    try:
        obj = json.loads(body)
    except ValueError:
        return b'["not", "an", "object"]'
    if not isinstance(obj, dict):
        return b'{"not": "a list"}'
    for key, value in obj.items():
        if isinstance(value, list):
            obj[key] = list(range(len(value)))
    return json.dumps(obj).encode()


def write_truncated(request: Request, body: bytes) -> int:
    """Send the first half of ``body`` (the headers announce all of it) and
    close the connection; returns the bytes sent."""
    cut = len(body) // 2
    request.write(body[:cut])
    transport: Any = request.channel.transport if request.channel else None
    if transport is not None:
        # The HTTP channel is the transport's producer: a plain loseConnection
        # would wait for the response to finish, which it never will.
        transport.unregisterProducer()
        transport.loseConnection()
    return cut


async def trickle(
    reactor: Any,
    request: Request,
    body: bytes,
    rule: Behaviour,
    client_gone: Callable[[], bool],
) -> int:
    """Write ``body`` one byte every :data:`TRICKLE_INTERVAL_S` while ``rule`` is
    in place (and for at most ``rule.seconds`` when > 0), then the rest at
    once. Stops if the client goes away. Returns the bytes trickled."""
    deadline = reactor.seconds() + rule.seconds if rule.seconds > 0 else None
    sent = 0
    while (
        sent < len(body)
        and rule.active
        and not client_gone()
        and (deadline is None or reactor.seconds() < deadline)
    ):
        request.write(body[sent : sent + 1])
        sent += 1
        await deferLater(reactor, TRICKLE_INTERVAL_S, lambda: None)
    if client_gone():
        return sent
    request.write(body[sent:])
    request.finish()
    return sent
