"""The Synapse module class (``synapse_partial_state.PartialStateModule``)."""

from __future__ import annotations

import logging
from typing import Any

from synapse.module_api import ModuleApi

from synapse_partial_state import __version__, _synapse
from synapse_partial_state.admin import ADMIN_PATH, AdminResource
from synapse_partial_state.config import PartialStateConfig, parse_config
from synapse_partial_state.joining.engine import ResyncEngine
from synapse_partial_state.joining.fetch import StateFetcher
from synapse_partial_state.joining.metrics import ResyncMetrics
from synapse_partial_state.joining.verify import VerifierPool, default_workers
from synapse_partial_state.resident.send_join import SendJoinEnricher
from synapse_partial_state.resident.state import StateServer
from synapse_partial_state.status import STATUS_PATH, StatusResource

logger = logging.getLogger(__name__)


class PartialStateModule:
    """The Synapse module: validates its config, installs its hooks, logs its role."""

    def __init__(self, config: PartialStateConfig, api: ModuleApi) -> None:
        self._api = api
        self._config = config
        _synapse.check_synapse_version(config.allow_untested_synapse)
        # Wherever this process resolves state (resident, joiner, persister).
        _synapse.install_identical_state_shortcut(api)
        # Wherever this process persists events (current state included).
        _synapse.install_current_state_guard(api)

        if config.resident.enabled:
            SendJoinEnricher(api, config.resident).install()
            StateServer.install_if_enabled(api, config.resident.state_cache)
        api.register_web_resource(STATUS_PATH, StatusResource(api, config, __version__))

        # Synapse runs remote joins and resyncs on the main process only
        # (do_invite_join asserts it), so that is where the engine lives.
        is_main = api.worker_app is None
        self.engine: ResyncEngine | None = None
        if config.resync.enabled and is_main:
            fetcher = None
            if config.resync.fast_state_fetch:
                fetch_ops = _synapse.StateFetchOps(api)
                _synapse.install_state_ids_reuse(fetch_ops)
                workers = config.resync.verify_workers
                pool = VerifierPool(
                    default_workers() if workers < 0 else workers,
                    _synapse.banned_signing_keys(),
                )
                fetcher = StateFetcher(fetch_ops, pool)
            self.engine = ResyncEngine(
                api,
                config.resync,
                _synapse.ResyncOps(api),
                ResyncMetrics(api.server_name),
                fetcher,
            )
            _synapse.install_resync_hook(self.engine.sync_room)
        api.register_web_resource(ADMIN_PATH, AdminResource(api, self.engine))

        if not config.resync.enabled:
            resync = "off (Synapse's own resync)"
        elif is_main:
            resync = "on: this process runs every resync"
        else:
            resync = "not here: resyncs run on the main process"
        logger.info(
            "synapse_partial_state %s loaded on the %s: resident send_join "
            "essentials %s; resync engine %s; patches: %s",
            __version__,
            "main process" if is_main else f"worker {api.worker_name}",
            "on" if config.resident.enabled else "off (native answers)",
            resync,
            ", ".join(p.target.rsplit(".", 1)[-1] for p in _synapse.INSTALLED_PATCHES)
            or "none",
        )

    @staticmethod
    def parse_config(config: Any) -> PartialStateConfig:
        return parse_config(config)
