"""Traffic during a run, and what it sent: every message must end up visible to
the local user.

Every ``interval`` seconds a random remote member sends a message through the
fake peer (which pushes it to the joiner, as the resident would); every other
tick the local user sends one through the client API; every fifth tick a new
remote member joins (a state change during the resync). A push the joiner did
not take (it was down, or answered an error) is sent again once the fault is
healed (:func:`redeliver`), as a real resident retries its transactions.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import requests
from bench.traffic import fake_members

from faults.context import Run
from tests.fedkit.matrix_client import Client


@dataclass
class Sent:
    """One message sent during the run."""

    body: str
    #: ``remote`` (a fake member, through the fake peer) or ``local`` (bob).
    by: str
    sender: str
    #: Wall time the send started.
    at: float
    event_id: str | None = None
    #: Remote: the joiner did not answer the push with 200 (sent again later).
    undelivered: bool = False
    #: Remote: the joiner answered 200 but with an error for this event.
    pdu_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Traffic:
    """The background traffic of one run (see the module docstring)."""

    def __init__(self, run: Run, interval: float, seed: int) -> None:
        self.run = run
        self.interval = interval
        self.sent: list[Sent] = []
        self.errors: list[str] = []
        self._rng = random.Random(seed)
        self._senders = fake_members(run.room, int(run.room["member_count"]) - 1)
        self._base = (
            f"{run.peer.control_url}/control/rooms/{quote(run.room_id, safe='')}"
        )
        self._http = requests.Session()
        self._http.trust_env = False
        # Its own session: the fault's thread uses bob's at the same time.
        self._bob = Client(run.bob.base_url, run.bob.user_id, run.bob.access_token)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=300)
        self._http.close()
        self._bob.close()

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            tick += 1
            self.remote_message(f"{self.run.name} remote {tick}")
            if tick % 2 == 0:
                self.local_message(self._bob, f"{self.run.name} local {tick}")
            if tick % 5 == 0:
                self._new_member()

    def remote_message(self, body: str) -> Sent:
        """A message from a random remote member, pushed to the joiner."""
        sent = Sent(body, "remote", self._rng.choice(self._senders), time.time())
        payload: dict[str, Any] = {
            "type": "m.room.message",
            "sender": sent.sender,
            "content": {"msgtype": "m.text", "body": body},
        }
        try:
            r = self._http.post(f"{self._base}/send", json=payload, timeout=300)
            r.raise_for_status()
            answer = r.json()
        except Exception as e:  # noqa: BLE001 - the message was not created
            self._error(f"remote message: {e!r}")
            return sent
        sent.event_id = answer["event_id"]
        joiner = self.run.hs.server_name
        status = answer.get("delivered", {}).get(joiner)
        sent.undelivered = status is not None and status != 200
        response = answer.get("responses", {}).get(joiner)
        if isinstance(response, dict):
            problem = (response.get("pdus") or {}).get(sent.event_id) or {}
            sent.pdu_error = problem.get("error") if isinstance(problem, dict) else None
        self.sent.append(sent)
        return sent

    def local_message(self, client: Client, body: str) -> Sent | None:
        """A message from a local user (None if the joiner refused it: down, or
        the user is not in the room)."""
        sent = Sent(body, "local", client.user_id, time.time())
        try:
            sent.event_id = client.send_message(self.run.room_id, body)
        except Exception as e:  # noqa: BLE001 - expected while faults last
            self._error(f"local message: {type(e).__name__}")
            return None
        self.sent.append(sent)
        return sent

    def _new_member(self) -> None:
        try:
            r = self._http.post(
                f"{self._base}/join_users", json={"count": 1}, timeout=300
            )
            r.raise_for_status()
        except Exception as e:  # noqa: BLE001 - counted, not fatal
            self._error(f"new member: {e!r}")

    def _error(self, what: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(what)


def redeliver(run: Run, sent: list[Sent]) -> int:
    """Push again the remote messages the joiner did not take, each from its
    sender's server, as a real resident retries; returns how many."""
    wanted = {m.event_id for m in sent if m.by == "remote" and m.undelivered}
    if not wanted:
        return 0
    events = run.peer.room_events(run.room_id, limit=1_000_000)["events"]
    pdus = [e for e in events if e["event_id"] in wanted]
    for i, event in enumerate(pdus):
        pdu = {k: v for k, v in event.items() if k != "event_id"}
        origin = pdu["sender"].split(":", 1)[1]
        answer = run.peer.federation_request(
            origin,
            run.hs.server_name,
            "PUT",
            f"/_matrix/federation/v1/send/{run.name}-redeliver-{i}",
            {
                "origin": origin,
                "origin_server_ts": int(time.time() * 1000),
                "pdus": [pdu],
                "edus": [],
            },
            timeout=120,
        )
        if answer["status"] != 200:
            run.log(f"redelivery of {event['event_id']}: {answer['status']}")
    run.log(f"{len(pdus)} undelivered message(s) pushed again")
    return len(pdus)
