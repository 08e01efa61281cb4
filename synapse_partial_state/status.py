"""``GET /_synapse/client/partial_state/v1/status``: what this process runs.

Unauthenticated and free of room data: the module's version, the Synapse version,
this process's role and the patches it installed. Tests use it to see that the module
is loaded; admins use it to check an upgrade.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attr
import synapse
from synapse.module_api import DirectServeJsonResource, ModuleApi

from synapse_partial_state.compat.patching import INSTALLED_PATCHES
from synapse_partial_state.config import PartialStateConfig

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

STATUS_PATH = "/_synapse/client/partial_state/v1/status"


class StatusResource(DirectServeJsonResource):
    def __init__(
        self, api: ModuleApi, config: PartialStateConfig, version: str
    ) -> None:
        super().__init__()
        self._api = api
        self._config = config
        self._version = version

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        return 200, {
            "module": "synapse_partial_state",
            "version": self._version,
            "synapse_version": synapse.__version__,
            "server_name": self._api.server_name,
            "worker": self._api.worker_name,
            "config": attr.asdict(self._config),
            "patches": [attr.asdict(p) for p in INSTALLED_PATCHES],
        }
