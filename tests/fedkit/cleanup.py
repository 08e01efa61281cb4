"""Nothing a test run starts outlives it: the registry of live homeservers.

Every :class:`~tests.fedkit.homeserver.Homeserver` is recorded here while it
may hold a process or a database; an ``atexit`` hook and SIGTERM/SIGINT handlers
(:func:`install_handlers`) stop the processes that are still running and drop
their databases (:func:`cleanup_all`), so a crashing test run leaves nothing
behind. (A SIGKILLed test process cannot clean up: its servers die with it
through ``PR_SET_PDEATHSIG``, see :mod:`tests.fedkit.process`, and its databases
stay until ``scripts-dev/fedkit gc``.)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

from tests.fedkit import postgres

logger = logging.getLogger(__name__)


class Cleanable(Protocol):
    """What the registry needs of a homeserver."""

    name: str

    def cleanup(self, background_drop: bool = False, kill: bool = False) -> None: ...


_registry_lock = threading.RLock()
_registry: dict[int, Cleanable] = {}
_handlers_installed = False


def register_server(server: Cleanable) -> None:
    """Record a live server, to be cleaned up by :func:`cleanup_all`."""
    with _registry_lock:
        _registry[id(server)] = server


def unregister_server(server: Cleanable) -> None:
    """Forget a server that cleaned up after itself."""
    with _registry_lock:
        _registry.pop(id(server), None)


def cleanup_all() -> None:
    """Stop every homeserver this process started and drop their databases."""
    with _registry_lock:
        servers = list(_registry.values())
    for hs in servers:
        # The databases are dropped next: a graceful Synapse shutdown (up to
        # its grace period on a loaded machine) buys nothing here.
        with _timed(f"stopping {hs.name} and dropping its database"):
            try:
                hs.cleanup(kill=True)
            except Exception:  # pragma: no cover - best effort at exit
                logger.exception("cleaning up %s failed", hs.name)
    with _timed("dropping pooled databases"):
        try:
            postgres.pg_pool.close()
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("dropping pooled databases failed")
    with _timed("waiting for background drops"):
        postgres.wait_for_background_drops()


#: A clean-up step slower than this is reported on stderr (it names the step
#: when a test that kills a test process times out on a loaded machine).
SLOW_STEP_S = 2.0


@contextlib.contextmanager
def _timed(step: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - started
        if took > SLOW_STEP_S:
            print(f"fedkit clean-up: {step} took {took:.1f} s", file=sys.stderr)


def install_handlers() -> None:
    """Run :func:`cleanup_all` at exit and on SIGTERM/SIGINT (once per process)."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue  # e.g. SIGINT in a background job: keep ignoring it

        def handler(num: int, frame: Any, previous: Any = previous) -> None:
            cleanup_all()
            if callable(previous):
                previous(num, frame)
            else:
                signal.signal(num, signal.SIG_DFL)
                os.kill(os.getpid(), num)

        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, handler)


def unwind_on_sigterm() -> None:
    """For command-line tools on the kit: SIGTERM unwinds like Ctrl-C, so that
    what their ``finally`` blocks stop (the fake peer) is stopped too (the
    kit's own handler stops the homeservers first, then calls this one)."""

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
