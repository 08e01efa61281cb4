"""Waiting for what hs2's join causes: its message seen on the other side, and the
full member list."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from tests.fedkit.fakepeer.control_client import FakePeer
from tests.fedkit.matrix_client import Client

T = TypeVar("T")


def lazy_filter(client: Client, room_id: str) -> str:
    """A lazy-loading sync filter for ``room_id`` (partial-state rooms need it)."""
    return json.dumps(client.lazy_loading_filter(room_id))


def wait_for_body(
    client: Client, room_id: str, body: str, since: str, deadline: float
) -> float:
    """Incremental syncs from ``since`` until a message with ``body`` shows up.

    Returns the wall-clock time it was seen."""
    filt = lazy_filter(client, room_id)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{client.user_id} never saw {body!r} in {room_id}")
        resp = client.sync(
            since=since, filter=filt, timeout_ms=int(min(remaining, 10) * 1000)
        )
        since = resp["next_batch"]
        room = resp.get("rooms", {}).get("join", {}).get(room_id, {})
        for ev in room.get("timeline", {}).get("events", []):
            if (
                ev.get("type") == "m.room.message"
                and ev.get("content", {}).get("body") == body
            ):
                return time.time()


def wait_for_transaction(
    peer: FakePeer, origin: str, destination: str, body: str, deadline: float
) -> float:
    """Poll the fake peer until ``destination`` received a PDU with ``body`` from ``origin``.

    Returns the (wall-clock) time the fake peer recorded the transaction."""
    while True:
        for txn in peer.transactions(origin=origin, destination=destination):
            for pdu in txn.get("body", {}).get("pdus", []):
                if (pdu.get("content") or {}).get("body") == body:
                    return float(txn["time"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{destination} never received {body!r} from {origin}")
        time.sleep(0.05)


def wait_full_members(
    client: Client, room_id: str, expected: int, deadline: float
) -> tuple[float, int]:
    """``/joined_members`` until it lists ``expected`` users; (wall time, count)."""
    count = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"{client.user_id}: {count} of {expected} members in {room_id}"
            )
        count = len(client.joined_members(room_id, timeout=remaining))
        if count >= expected:
            return time.time(), count
        time.sleep(0.2)


def timed_messages(
    client: Client, room_id: str, deadline: float
) -> tuple[float, float]:
    """One ``/messages`` backwards from the end of ``room_id`` (its own session:
    the caller's client is busy in other threads); (seconds it took, wall-clock
    time it answered)."""
    from urllib.parse import quote

    own = Client(client.base_url, client.user_id, client.access_token)
    try:
        path = f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages"
        started = time.monotonic()
        status, body = own.get(
            path,
            params={"dir": "b", "limit": "20"},
            timeout=max(deadline - started, 1),
        )
        took = time.monotonic() - started
    finally:
        own.close()
    if status != 200:
        raise RuntimeError(f"/messages of {room_id}: {status} {body}")
    return took, time.time()


def in_thread(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run ``fn(*args)`` on a daemon thread (abandoned, not joined, on errors)."""
    fut: Future[T] = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    threading.Thread(target=run, name=f"bench-{fn.__name__}", daemon=True).start()
    return fut
