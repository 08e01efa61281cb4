"""Traffic during the join: messages from random fake members, in the background."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests


@dataclass
class TrafficStats:
    sent: int = 0
    failed: int = 0
    undelivered: int = 0  # a real server answered non-200 or not at all
    max_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class Traffic:
    """Messages from random fake members every ``interval`` seconds, in the background.

    Each send goes through the fake peer's control API, which pushes the event to
    every real server in the room; sends run on a few threads so a slow receiver
    does not slow the cadence."""

    def __init__(
        self,
        control_url: str,
        room_id: str,
        senders: list[str],
        interval: float,
        seed: int = 0,
    ) -> None:
        self.url = f"{control_url}/control/rooms/{quote(room_id, safe='')}/send"
        self.senders = senders
        self.interval = interval
        self.stats = TrafficStats()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="traffic")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> Traffic:
        if self.interval > 0 and self.senders:
            self._thread.start()
        return self

    def stop(self) -> TrafficStats:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        return self.stats

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.trust_env = False
        return s

    def _run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            n += 1
            sender = self._rng.choice(self.senders)
            self._pool.submit(self._send, sender, f"traffic message {n}")
            next_at += self.interval
            if next_at < time.monotonic():  # fell behind: skip missed ticks
                next_at = time.monotonic() + self.interval

    def _send(self, sender: str, body: str) -> None:
        started = time.monotonic()
        payload: dict[str, Any] = {
            "type": "m.room.message",
            "sender": sender,
            "content": {"msgtype": "m.text", "body": body},
        }
        try:
            r = self._session().post(self.url, json=payload, timeout=600)
            ok = r.status_code == 200
            delivered = r.json().get("delivered", {}) if ok else {}
            error = None if ok else f"{r.status_code} {r.text[:200]}"
        except Exception as e:  # noqa: BLE001 - counted, not fatal
            ok, delivered, error = False, {}, repr(e)
        with self._lock:
            self.stats.sent += 1
            self.stats.max_seconds = max(
                self.stats.max_seconds, round(time.monotonic() - started, 3)
            )
            if not ok:
                self.stats.failed += 1
                if error and len(self.stats.errors) < 5:
                    self.stats.errors.append(error)
            self.stats.undelivered += sum(1 for s in delivered.values() if s != 200)


def fake_members(room: dict[str, Any], members: int) -> list[str]:
    """User IDs of the fake room's members (as the fake peer's synthesiser names them)."""
    names = room["servers"]
    return [f"@u{i}:{names[i % len(names)]}" for i in range(members)]
