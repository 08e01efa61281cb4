"""One live run: the fake resident and its room, the joiner and its users, the
random moments a fault waits for, and what happened (the run's record).

A fault kind (:mod:`faults.kinds`) runs on its own thread next to the runner's:
it waits for its moment (:meth:`Run.wait_for`), injects the fault
(:meth:`Run.injected`), waits a while and heals it (:meth:`Run.healed`). A
fault that acts before the join (a resident misbehaving from the start) does
so before the runner lets ``bob`` join: the runner waits on
:attr:`Run.ready_for_join`, which the fault sets once it has injected or is
waiting for a moment after the join.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from tests.blackbox.endpoints import ADMIN
from tests.fedkit.fakepeer.control_client import FakePeer
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client

#: Moments a fault may be injected at (see :class:`Moment`).
BEFORE_JOIN = "before_join"
AFTER_JOIN = "after_join"
DELAY = "delay"
PROGRESS = "progress"
APPLYING = "applying"

#: Longest wait for a moment that depends on the job's progress.
MOMENT_TIMEOUT_S = 120
#: Longest wait for bob's join, as seen by a fault waiting for it.
JOIN_TIMEOUT_S = 180


class RunStopped(Exception):
    """The runner gave up on the run: the fault's thread unwinds."""


@dataclass(frozen=True)
class Moment:
    """When a fault is injected: ``before_join`` (the resident misbehaves from the
    start), ``after_join`` (``/join`` returned), ``delay`` (``value`` seconds after
    it), ``progress`` (the job has stored ``value`` of the room's state events) or
    ``applying`` (the state at the join is stored; later events are being
    brought to full state, or Synapse is finishing)."""

    kind: str
    value: float = 0.0

    def describe(self) -> str:
        if self.kind == DELAY:
            return f"{self.value:.1f} s after /join"
        if self.kind == PROGRESS:
            return f"at {self.value:.0%} of the state stored"
        return self.kind


def pick_moment(rng: random.Random, kinds: tuple[str, ...], delay_max: float) -> Moment:
    """A moment of one of ``kinds``, drawn from ``rng``."""
    kind = rng.choice(kinds)
    if kind == DELAY:
        return Moment(kind, rng.uniform(0, delay_max))
    if kind == PROGRESS:
        return Moment(kind, rng.uniform(0.05, 0.95))
    return Moment(kind)


class Run:
    """Everything one run touches, and its record (:meth:`record`)."""

    def __init__(
        self,
        name: str,
        seed: int,
        peer: FakePeer,
        room: dict[str, Any],
        hs: Homeserver,
        admin: Client,
        bob: Client,
        expected_s: float,
    ) -> None:
        self.name = name
        #: Roughly how long the resync takes without faults: random delays
        #: are drawn within it.
        self.expected_s = expected_s
        self.peer = peer
        self.room = room
        self.room_id: str = room["room_id"]
        self.resident: str = room["resident"]
        self.hs = hs
        self.admin = admin
        self.bob = bob
        #: The fault's random draws (the traffic has its own).
        self.rng = random.Random(seed)
        self.started = time.monotonic()
        self.timeline: list[str] = []
        self.notes: dict[str, Any] = {}
        #: (outcome, detail) for every invariant the run broke.
        self.violations: list[tuple[str, str]] = []
        self.joined = threading.Event()
        self.ready_for_join = threading.Event()
        self.stopped = threading.Event()
        #: Wall time from which every message sent must be visible to bob: when
        #: his last /join returned (a rejoin after a purge starts afresh).
        self.window_start = 0.0
        #: Messages sent by fault kinds themselves (see :mod:`faults.traffic`).
        self.extra_messages: list[Any] = []

    # -- the record --------------------------------------------------------------

    def log(self, what: str) -> None:
        """A line of the run's timeline (seconds since the run started)."""
        self.timeline.append(f"{time.monotonic() - self.started:7.1f}s {what}")

    def violation(self, outcome: str, detail: str) -> None:
        self.violations.append((outcome, detail))
        self.log(f"VIOLATION {outcome}: {detail}")

    def record(self) -> dict[str, Any]:
        return {
            "notes": self.notes,
            "timeline": self.timeline,
            "violations": [{"outcome": o, "detail": d} for o, d in self.violations],
        }

    # -- looking at the joiner ---------------------------------------------------

    def sql(
        self, statement: str, params: tuple[Any, ...] = ()
    ) -> list[tuple[Any, ...]]:
        """``hs.sql``, tried again for a few seconds when the database refuses
        (PostgreSQL connections being terminated, SQLite busy)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.hs.sql(statement, params)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def is_partial(self) -> bool:
        """Whether Synapse holds the room as partial-state."""
        rows = self.sql(
            "SELECT 1 FROM partial_state_rooms WHERE room_id = ?", (self.room_id,)
        )
        return bool(rows)

    def job(self) -> dict[str, Any] | None:
        """The job, as the admin API shows it; None before the engine wrote it,
        or while the joiner does not answer."""
        try:
            status, body = self.admin.get(f"{ADMIN}/{quote(self.room_id)}", timeout=10)
        except requests.RequestException:
            return None
        return body if status == 200 and isinstance(body, dict) else None

    def target_server(self) -> str:
        """The server the resync is asking now (the one it joined via, first)."""
        job = self.job()
        return (job or {}).get("current_destination") or self.resident

    # -- a fault's life ----------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        if self.stopped.wait(max(0.0, seconds)):
            raise RunStopped()

    def wait_for(self, moment: Moment) -> None:
        """Return at ``moment`` (at once for ``before_join``)."""
        self.notes["moment"] = moment.describe()
        if moment.kind == BEFORE_JOIN:
            return
        self.ready_for_join.set()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not self.joined.wait(0.2):
            if self.stopped.is_set() or time.monotonic() > deadline:
                raise RunStopped()
        if moment.kind == DELAY:
            self.sleep(moment.value)
        elif moment.kind == PROGRESS:
            size = max(1, int(self.room["state_event_count"]))
            self._wait_job(lambda j: j["events_persisted"] >= moment.value * size)
        elif moment.kind == APPLYING:
            self._wait_job(lambda j: j["phase"] in ("applying", "replaying"))

    def _wait_job(self, ready: Any) -> None:
        """Until ``ready(job)``, the job is over, or :data:`MOMENT_TIMEOUT_S`."""
        deadline = time.monotonic() + MOMENT_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.job()
            if job is not None and (job["phase"] in ("done", "aborted") or ready(job)):
                return
            self.sleep(0.1)

    def injected(self, what: str, hit: bool | None = None) -> None:
        """The fault is in place. ``hit``: whether it caught the resync running
        (None: the room is partial right now, if bob has joined)."""
        if hit is None and self.joined.is_set():
            hit = self.is_partial()
        if hit is not None:
            self.notes["hit"] = hit
        self.notes["injected"] = what
        self.notes["injected_at_s"] = round(time.monotonic() - self.started, 1)
        self.log(
            f"fault: {what}" + ("" if hit is None else f" (resync running: {hit})")
        )
        self.ready_for_join.set()

    def healed(self, what: str) -> None:
        self.notes["healed_at_s"] = round(time.monotonic() - self.started, 1)
        self.log(f"healed: {what}")

    def rejoined(self, client: Client) -> None:
        """``client`` (bob) joined again: messages from now on must be visible."""
        client.join(self.room_id, via=[self.resident], timeout=120)
        self.window_start = time.time()
        self.log(f"{client.user_id} joined again")
