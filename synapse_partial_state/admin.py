"""Admin API for partial-state rooms (a server admin's access token required).

Under Synapse's admin prefix, on the listeners that serve Synapse's own admin API
(those with the ``client`` resource; see :mod:`.compat.web`):

* ``GET  /_synapse/admin/v1/partial_state/rooms[?all=true]``: resync jobs
  (unfinished ones; ``all=true`` adds done and aborted) with phase, progress,
  attempts, last error and an ETA; and ``patches_active`` (false, with
  ``patches_reason``, on an untested Synapse: no engine, Synapse resyncs as stock).
  Each job carries ``device_lists``: the local device-list changes queued for
  replay at completion (``outgoing_queued``, ``oldest_queued_ts``); the list
  adds ``incoming_device_list_updates_queued`` (remote updates kept until a
  resync shows whether their users share a room).
* ``GET  .../partial_state/rooms/{roomId}``: one job.
* ``POST .../partial_state/rooms/{roomId}/retry``: end the back-off now and try again.
* ``POST .../partial_state/rooms/{roomId}/abort``: give the room up (as if its last
  local user had left): partial flags cleared through Synapse's paths, waiters woken.

Served by the process that runs resyncs (the main process); other processes
answer 404 with a hint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attr
from synapse.module_api import ModuleApi
from synapse.module_api.errors import SynapseError

from synapse_partial_state.compat.patching import VersionGate
from synapse_partial_state.compat.web import AdminRoute
from synapse_partial_state.device_lists.store import DeviceListStore
from synapse_partial_state.joining.jobs import Job, eta_seconds
from synapse_partial_state.status import patches_fields

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_partial_state.joining.engine import ResyncEngine

#: The admin API's paths after Synapse's admin prefix (``/_synapse/admin``).
_ROOMS = "/v1/partial_state/rooms"
_ROOM = _ROOMS + "/(?P<room_id>[^/]+)"


def job_json(
    job: Job,
    now: int,
    running: bool,
    queued: tuple[int, int | None] = (0, None),
) -> dict[str, Any]:
    body = attr.asdict(job)
    body["phase"] = job.phase.value
    body["destinations"] = list(job.destinations)
    body["tried"] = list(job.tried)
    body["running"] = running
    eta = eta_seconds(job, now)
    body["eta_seconds"] = None if eta is None else round(eta, 1)
    body["device_lists"] = {"outgoing_queued": queued[0], "oldest_queued_ts": queued[1]}
    return body


class AdminApi:
    """The admin API's handlers; :meth:`routes` says where Synapse routes them."""

    def __init__(
        self, api: ModuleApi, engine: ResyncEngine | None, gate: VersionGate
    ) -> None:
        self._api = api
        self._engine = engine
        self._gate = gate
        self._device_lists = DeviceListStore(api)

    def routes(self) -> list[AdminRoute]:
        return [
            AdminRoute("GET", _ROOMS + "/?$", self.list_rooms, "PartialStateRooms"),
            AdminRoute("GET", _ROOM + "/?$", self.get_room, "PartialStateRoom"),
            AdminRoute(
                "POST", _ROOM + "/retry/?$", self.retry_room, "PartialStateRoomRetry"
            ),
            AdminRoute(
                "POST", _ROOM + "/abort/?$", self.abort_room, "PartialStateRoomAbort"
            ),
        ]

    async def _require_admin(self, request: SynapseRequest) -> None:
        requester = await self._api.get_user_by_req(request)
        if not await self._api.is_user_admin(requester.user.to_string()):
            raise SynapseError(403, "You are not a server admin", "M_FORBIDDEN")

    def _engine_here(self) -> ResyncEngine:
        if not self._gate.patches_active:
            raise SynapseError(
                404,
                f"The module's patches are off ({self._gate.reason}): "
                "Synapse runs resyncs itself",
                "M_NOT_FOUND",
            )
        if self._engine is None:
            raise SynapseError(
                404,
                "Resyncs do not run on this process; ask the main process",
                "M_NOT_FOUND",
            )
        return self._engine

    async def _authorise(self, request: SynapseRequest) -> ResyncEngine:
        await self._require_admin(request)
        return self._engine_here()

    async def list_rooms(self, request: SynapseRequest) -> tuple[int, dict]:
        await self._require_admin(request)
        if not self._gate.patches_active:
            # Say it where an admin looks: no job (Synapse resyncs as stock), and why.
            return 200, {"rooms": [], **patches_fields(self._gate)}
        engine = self._engine_here()
        now = engine.now_ms()
        show_all = request.args.get(b"all", [b"false"])[0] == b"true"
        jobs = await engine.list_jobs(include_finished=show_all)
        queued = await self._device_lists.outbound_rooms()
        return 200, {
            "rooms": [
                job_json(
                    j,
                    now,
                    engine.is_running(j.room_id),
                    queued.get(j.room_id, (0, None)),
                )
                for j in jobs
            ],
            "incoming_device_list_updates_queued": len(
                await self._device_lists.inbound()
            ),
            **patches_fields(self._gate),
        }

    async def get_room(self, request: SynapseRequest, room_id: str) -> tuple[int, dict]:
        engine = await self._authorise(request)
        job = await engine.get_job(room_id)
        if job is None:
            raise SynapseError(404, f"No resync job for {room_id}", "M_NOT_FOUND")
        queued = (await self._device_lists.outbound_rooms()).get(room_id, (0, None))
        return 200, job_json(job, engine.now_ms(), engine.is_running(room_id), queued)

    async def retry_room(
        self, request: SynapseRequest, room_id: str
    ) -> tuple[int, dict]:
        engine = await self._authorise(request)
        started = await engine.retry_now(room_id)
        return 200, {"room_id": room_id, "retrying": True, "started": started}

    async def abort_room(
        self, request: SynapseRequest, room_id: str
    ) -> tuple[int, dict]:
        engine = await self._authorise(request)
        await engine.abort_now(room_id)
        return 200, {"room_id": room_id, "aborted": True}
