"""``GET /_matrix/client/unstable/org.matrix.msc2775/rooms/{roomId}/partial_state``:
how far this server is with a partial-state room, for a user joined to it.

* 200 ``{"syncing": true, "progress": {...} | null, "eta_seconds": N | null,
  "summary": {"m.heroes": [...], "m.joined_member_count": N,
  "m.invited_member_count": N}}`` while the room is partial (``progress`` from the
  resync job's row, null while there is none, e.g. with ``resync.enabled: false``;
  the summary as Synapse computes it for ``/sync``, from the members known so far);
* 200 ``{"syncing": false}`` once it is complete;
* 403 ``M_FORBIDDEN`` for a user not joined to the room: the same answer whether
  or not this server knows the room, so that the endpoint does not tell which
  rooms exist here;
* 401 without (or with an unknown) access token, as everywhere in Synapse.

Served wherever Synapse serves the client API (main process or client workers):
the job row is read from the database (:class:`~..joining.store.JobStore`), the
rest from Synapse's caches (:class:`~..compat.clients.ClientOps`).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Protocol

from synapse.module_api import ModuleApi
from synapse.module_api.errors import Codes, SynapseError

from synapse_partial_state.compat.web import CLIENT_API_PREFIX, ClientRoute
from synapse_partial_state.joining.jobs import Job, eta_seconds
from synapse_partial_state.wire import CLIENT_UNSTABLE_PREFIX

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_partial_state.compat.clients import MemberSummary

#: The endpoint's path, for clients and tests (``{roomId}`` URL-encoded).
PARTIAL_STATE_PATH = CLIENT_UNSTABLE_PREFIX + "/rooms/{room_id}/partial_state"

#: The route's regular expression after ``/_matrix/client``.
_ROUTE = (
    re.escape(CLIENT_UNSTABLE_PREFIX.removeprefix(CLIENT_API_PREFIX))
    + "/rooms/(?P<room_id>[^/]*)/partial_state$"
)

#: The same answer for a room the user is not in and a room unknown here.
NOT_IN_ROOM = "You are not joined to this room"


class RoomFacts(Protocol):
    """What the endpoint reads from Synapse (:class:`~..compat.clients.ClientOps`)."""

    async def is_joined(self, user_id: str, room_id: str) -> bool: ...

    async def is_partial_state(self, room_id: str) -> bool: ...

    async def member_summary(self, room_id: str, user_id: str) -> MemberSummary: ...

    def now_ms(self) -> int: ...


class JobReader(Protocol):
    """Reads a room's resync job (:class:`~..joining.store.JobStore`)."""

    async def get(self, room_id: str) -> Job | None: ...


def progress_json(job: Job) -> dict[str, Any]:
    """The job's progress, as clients see it: phase, events stored (the state at
    the join), events brought to full state since, events remaining, failed
    rounds. A client shows ``done / (done + remaining)`` with ``done`` the sum of
    the first two."""
    return {
        "phase": job.phase.value,
        "events_persisted": job.events_persisted,
        "events_applied": job.events_applied,
        "events_remaining": job.events_remaining,
        "attempts": job.attempts,
    }


def summary_json(summary: MemberSummary) -> dict[str, Any]:
    """The summary block, with ``/sync``'s names."""
    return {
        "m.heroes": list(summary.heroes),
        "m.joined_member_count": summary.joined_member_count,
        "m.invited_member_count": summary.invited_member_count,
    }


def syncing_answer(
    job: Job | None, now_ms: int, summary: MemberSummary
) -> dict[str, Any]:
    """The answer for a partial-state room (``job``: its resync job, if any; a
    finished one is an earlier join's, before the engine has written this one's)."""
    if job is not None and job.phase.final:
        job = None
    eta = None if job is None else eta_seconds(job, now_ms)
    return {
        "syncing": True,
        "progress": None if job is None else progress_json(job),
        "eta_seconds": None if eta is None else math.ceil(eta),
        "summary": summary_json(summary),
    }


class PartialStateEndpoint:
    """The endpoint's handler; :meth:`routes` says where Synapse routes it."""

    def __init__(self, api: ModuleApi, facts: RoomFacts, jobs: JobReader) -> None:
        self._api = api
        self._facts = facts
        self._jobs = jobs

    def routes(self) -> list[ClientRoute]:
        """Under Synapse's client prefix (``/_matrix/client``)."""
        return [ClientRoute("GET", _ROUTE, self.on_GET, "MSC2775PartialState")]

    async def on_GET(self, request: SynapseRequest, room_id: str) -> tuple[int, dict]:
        requester = await self._api.get_user_by_req(request)
        user_id = requester.user.to_string()
        if not await self._facts.is_joined(user_id, room_id):
            raise SynapseError(403, NOT_IN_ROOM, Codes.FORBIDDEN)
        return 200, await self.answer(room_id, user_id)

    async def answer(self, room_id: str, user_id: str) -> dict[str, Any]:
        """The answer for ``user_id``, joined to ``room_id``."""
        if not await self._facts.is_partial_state(room_id):
            return {"syncing": False}
        job = await self._jobs.get(room_id)
        summary = await self._facts.member_summary(room_id, user_id)
        return syncing_answer(job, self._facts.now_ms(), summary)
