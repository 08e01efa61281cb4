"""Running coroutines that never suspend, in unit tests with Synapse faked."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine whose every await is immediate (fakes that return at
    once); fail the test if it suspends."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("coroutine suspended")
