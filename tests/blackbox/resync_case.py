"""What the resync tests share: a fake resident hosting a room, a real joiner
(``hs2``) with an admin and a member, fast back-offs, and waits on the job."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from tests.blackbox.endpoints import ADMIN
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client
from tests.fedkit.testcase import FederationTestCase

STATE_PATHS = r"^/_matrix/federation/v1/state(_ids)?/"
STATE_PATH = r"^/_matrix/federation/v1/state/"
EVENT_PATH = r"^/_matrix/federation/v1/event/"

#: Fast retries so tests do not wait for production back-offs: ours and
#: Synapse's per-destination back-off (10 minutes by default).
FAST = {
    "module_config": {
        "resync": {"initial_backoff_seconds": 0.5, "max_backoff_seconds": 2}
    },
    "extra_config": {
        "federation": {
            "destination_min_retry_interval": 200,
            "destination_max_retry_interval": 1000,
        }
    },
}

#: Servers in the room of a test whose servers all fail (``join_while_state_fails``,
#: a 502 for every state request): Synapse's federation client retries a 502
#: three times (0.5, 1 and 2 s apart), so each failed round of the resync takes
#: about 4 s per server; two servers keep a round short and still fail over.
DOWN_SERVERS = 2


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


class ResyncCase(FederationTestCase):
    MEMBERS = 200
    SERVERS = 5
    #: The room's type (its create event's ``type``), e.g. ``m.space``.
    ROOM_TYPE: str | None = None
    #: The room's ``m.room.history_visibility``.
    HISTORY_VISIBILITY = "shared"

    def setup_room(self, **hs_kw: Any) -> None:
        self.peer = self.make_fake_peer()
        self.room = self.peer.create_room(
            members=self.MEMBERS,
            servers=self.SERVERS,
            name="Resync room",
            room_version=self.ROOM_VERSION or "10",
            room_type=self.ROOM_TYPE,
            history_visibility=self.HISTORY_VISIBILITY,
        )
        self.room_id: str = self.room["room_id"]
        self.resident: str = self.room["resident"]
        kw = {**FAST, **hs_kw}
        self.hs2: Homeserver = self.make_homeserver("hs2", **kw)
        self.admin: Client = self.register(self.hs2, "admin", admin=True)
        self.bob: Client = self.register(self.hs2, "bob")

    def job(self) -> dict[str, Any]:
        status, body = self.admin.get(f"{ADMIN}/{quote(self.room_id)}")
        self.assertEqual(status, 200, body)
        return body

    def job_if_any(self) -> dict[str, Any] | None:
        """The job, or None while the engine has not written it yet (it starts
        in the background once /join has returned)."""
        status, body = self.admin.get(f"{ADMIN}/{quote(self.room_id)}")
        if status == 404 and body.get("errcode") == "M_NOT_FOUND":
            return None
        self.assertEqual(status, 200, body)
        return body

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(
            lambda: (j := self.job_if_any()) is not None and j["phase"] == phase and j,
            timeout,
            f"phase {phase}",
        )

    def wait_complete(self, since: int, timeout: float = 120) -> None:
        self.hs2.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} complete",
            timeout=timeout,
            since=since,
        )

    def join_while_state_fails(self) -> str:
        """bob joins while every server fails state requests; returns the rule
        once the job is backing off."""
        rule = self.peer.add_behaviour(STATE_PATHS, "error", status=502)
        self.bob.join(self.room_id, via=[self.resident])
        self.wait_phase("retrying")
        return rule

    def heal_and_join_again(self, rule: str) -> None:
        """Servers answer again; a fresh join completes with the whole room."""
        self.peer.remove_behaviour(rule)
        since = self.hs2.log_offset()
        self.bob.join(self.room_id, via=[self.resident])
        self.wait_complete(since)
        self.assert_full_members()

    def join_resync_and_see(self, body: str = "seen") -> None:
        """bob joins, the resync completes, and a message the resident sends
        after it reaches bob."""
        since = self.hs2.log_offset()
        self.bob.join(self.room_id, via=[self.resident])
        self.wait_complete(since)
        self.peer.send_event(
            self.room_id, "m.room.message", {"msgtype": "m.text", "body": body}
        )
        self.bob.wait_for_message(self.room_id, body)

    def assert_full_members(self, extra: int = 1) -> None:
        members = self.bob.joined_members(self.room_id, timeout=60)
        self.assertEqual(len(members), self.room["member_count"] + extra)

    def assert_resident_state(self) -> None:
        """hs2's state of the room is exactly the resident's."""
        self.assert_full_members()
        expected = resident_state(
            self.peer.room_events(self.room_id, limit=100000)["events"]
        )
        got = {
            (e["type"], e["state_key"]): e["event_id"]
            for e in self.bob.room_state(self.room_id)
        }
        self.assertEqual(got, expected)


def resident_state(events: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """Current state of a linear event log: the last event of each state key."""
    state: dict[tuple[str, str], str] = {}
    for event in events:
        if "state_key" in event:
            state[(event["type"], event["state_key"])] = event["event_id"]
    return state
