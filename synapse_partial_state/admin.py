"""Admin API for partial-state rooms (admin access token required).

* ``GET  /_synapse/client/partial_state/v1/admin/rooms[?all=true]``: resync jobs
  (unfinished ones; ``all=true`` adds done and aborted) with phase, progress,
  attempts, last error and an ETA.
* ``GET  .../admin/rooms/{roomId}``: one job.
* ``POST .../admin/rooms/{roomId}/retry``: end the back-off now and try again.
* ``POST .../admin/rooms/{roomId}/abort``: give the room up (as if its last local
  user had left): partial flags cleared through Synapse's paths, waiters woken.

Served by the process that runs resyncs (the main process); other processes
answer 404 with a hint.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import attr
from synapse.module_api import DirectServeJsonResource, ModuleApi
from synapse.module_api.errors import SynapseError

from synapse_partial_state.joining.jobs import Job, eta_seconds

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_partial_state.joining.engine import ResyncEngine

ADMIN_PATH = "/_synapse/client/partial_state/v1/admin/rooms"
_ROOM = re.compile(r"^/(?P<room>[^/]+)(?:/(?P<action>retry|abort))?/?$")


def job_json(job: Job, now: int, running: bool) -> dict[str, Any]:
    body = attr.asdict(job)
    body["phase"] = job.phase.value
    body["destinations"] = list(job.destinations)
    body["tried"] = list(job.tried)
    body["running"] = running
    eta = eta_seconds(job, now)
    body["eta_seconds"] = None if eta is None else round(eta, 1)
    return body


class AdminResource(DirectServeJsonResource):
    #: Sub-paths (room IDs, actions) are parsed here rather than by child resources.
    isLeaf = True

    def __init__(self, api: ModuleApi, engine: ResyncEngine | None) -> None:
        super().__init__()
        self._api = api
        self._engine = engine

    async def _authorise(self, request: SynapseRequest) -> ResyncEngine:
        requester = await self._api.get_user_by_req(request)
        if not await self._api.is_user_admin(requester.user.to_string()):
            raise SynapseError(403, "You are not a server admin", "M_FORBIDDEN")
        if self._engine is None:
            raise SynapseError(
                404,
                "Resyncs do not run on this process; ask the main process",
                "M_NOT_FOUND",
            )
        return self._engine

    def _sub_path(self, request: SynapseRequest) -> str:
        path = request.path.decode("ascii")
        return path[len(ADMIN_PATH) :] if path.startswith(ADMIN_PATH) else path

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        engine = await self._authorise(request)
        now = engine.now_ms()
        sub = self._sub_path(request)
        if sub in ("", "/"):
            show_all = request.args.get(b"all", [b"false"])[0] == b"true"
            jobs = await engine.list_jobs(include_finished=show_all)
            return 200, {
                "rooms": [job_json(j, now, engine.is_running(j.room_id)) for j in jobs]
            }
        m = _ROOM.match(sub)
        if not m or m.group("action"):
            raise SynapseError(404, "Unknown admin path", "M_NOT_FOUND")
        room_id = unquote(m.group("room"))
        job = await engine.get_job(room_id)
        if job is None:
            raise SynapseError(404, f"No resync job for {room_id}", "M_NOT_FOUND")
        return 200, job_json(job, now, engine.is_running(room_id))

    async def _async_render_POST(self, request: SynapseRequest) -> tuple[int, dict]:
        engine = await self._authorise(request)
        m = _ROOM.match(self._sub_path(request))
        if not m or not m.group("action"):
            raise SynapseError(404, "Unknown admin path", "M_NOT_FOUND")
        room_id = unquote(m.group("room"))
        action = m.group("action")
        if action == "retry":
            started = await engine.retry_now(room_id)
            return 200, {"room_id": room_id, "retrying": True, "started": started}
        await engine.abort_now(room_id)
        return 200, {"room_id": room_id, "aborted": True}
