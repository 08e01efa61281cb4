"""``GET /_synapse/client/partial_state/v1/status``: is the module loaded, and (for a
server admin) what this process runs.

Anyone gets the minimal answer, enough for a health check and nothing an attacker
could use: ``{"module", "version", "loaded": true}``, and whether the module's
patches are active (``patches_active``; false, with ``patches_reason``, when the
version gate turned them off on an untested Synapse: a monitor can alert on it).
A server admin's access token adds the Synapse version, the version gate's
decision, this process's role, the module's config and every patch (admins use it
to check an upgrade; tests to see what is installed). An unknown token is refused
(401), as everywhere in Synapse, rather than silently answered with less. It
answers only on listeners that serve the client API (see
:func:`~synapse_partial_state.compat.web.on_client_listeners`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attr
import synapse
from synapse.module_api import DirectServeJsonResource, ModuleApi
from synapse.module_api.errors import Codes, InvalidClientCredentialsError

from synapse_partial_state.compat.bulk.gate import BulkGate
from synapse_partial_state.compat.patching import (
    INSTALLED_MOUNTS,
    INSTALLED_PATCHES,
    VersionGate,
)
from synapse_partial_state.config import PartialStateConfig

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

STATUS_PATH = "/_synapse/client/partial_state/v1/status"


def patches_fields(gate: VersionGate) -> dict[str, Any]:
    """Whether the module's patches are active here, and why not (no version named):
    in the status endpoint's answers and the admin API's room list."""
    return {"patches_active": gate.patches_active, "patches_reason": gate.reason}


class StatusResource(DirectServeJsonResource):
    def __init__(
        self,
        api: ModuleApi,
        config: PartialStateConfig,
        version: str,
        gate: VersionGate,
        bulk_gate: BulkGate | None = None,
    ) -> None:
        super().__init__()
        self._api = api
        self._config = config
        self._version = version
        self._gate = gate
        #: the bulk writers' verdict (None: no engine state fetch here)
        self._bulk_gate = bulk_gate

    async def _is_admin(self, request: SynapseRequest) -> bool:
        """Whether the request carries a server admin's token (no token: False)."""
        try:
            requester = await self._api.get_user_by_req(request)
        except InvalidClientCredentialsError as e:
            if e.errcode == Codes.MISSING_TOKEN:
                return False
            raise
        return await self._api.is_user_admin(requester.user.to_string())

    def minimal(self) -> dict[str, Any]:
        return {
            "module": "synapse_partial_state",
            "version": self._version,
            "loaded": True,
            **patches_fields(self._gate),
        }

    def full(self) -> dict[str, Any]:
        return {
            **self.minimal(),
            "synapse_version": synapse.__version__,
            "version_gate": attr.asdict(self._gate),
            "bulk_writers": (
                None if self._bulk_gate is None else attr.asdict(self._bulk_gate)
            ),
            "server_name": self._api.server_name,
            "worker": self._api.worker_name,
            "config": attr.asdict(self._config),
            "patches": [attr.asdict(p) for p in INSTALLED_PATCHES],
            "mounts": [attr.asdict(p) for p in INSTALLED_MOUNTS],
        }

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        if await self._is_admin(request):
            return 200, self.full()
        return 200, self.minimal()
