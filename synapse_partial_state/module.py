"""The Synapse module class (``synapse_partial_state.PartialStateModule``).

All wiring happens here, in one style: each part (resident, joining) is a plain
object that knows nothing of how it is reached; this class creates the parts and
hands their callbacks to the compat layer's ``install_*`` functions.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from synapse.module_api import ModuleApi

from synapse_partial_state import __version__
from synapse_partial_state.admin import AdminApi
from synapse_partial_state.clients import syncing
from synapse_partial_state.clients.endpoint import PartialStateEndpoint
from synapse_partial_state.clients.members import MembersDuringResync
from synapse_partial_state.clients.summary import JoinSummaries
from synapse_partial_state.compat import memory, patching, send_join, servlets
from synapse_partial_state.compat.backfill import (
    install_backfill,
    skip_reuse_while_backfilling,
)
from synapse_partial_state.compat.bulk import gate as bulk_gate
from synapse_partial_state.compat.bulk.delta_reads import install_shared_delta_reads
from synapse_partial_state.compat.bulk.deltas import install_delta_batching
from synapse_partial_state.compat.bulk.finish import install_bulk_finish
from synapse_partial_state.compat.bulk.gate import BulkGate
from synapse_partial_state.compat.bulk.outliers import (
    bulk_outlier_writer,
    install_join_outliers,
)
from synapse_partial_state.compat.clients import ClientOps
from synapse_partial_state.compat.join_summary import install_join_summary_capture
from synapse_partial_state.compat.joined_hosts import (
    JoinedHostsOps,
    handles_federation,
    install_un_partial_observer,
    serves_federation,
)
from synapse_partial_state.compat.make_join import (
    install_join_key_prefetch,
    install_make_join_reads,
    install_signing_servers_hint,
    servers_with_stored_keys,
)
from synapse_partial_state.compat.partial_reads import install_partial_reads
from synapse_partial_state.compat.persistence import install_current_state_guard
from synapse_partial_state.compat.prev_state import install_fast_prev_state
from synapse_partial_state.compat.resident_state import (
    install_event_invalidation_hook,
)
from synapse_partial_state.compat.resync import (
    ResyncOps,
    install_local_membership_observer,
    install_resync_hook,
)
from synapse_partial_state.compat.runtime import call_later_s
from synapse_partial_state.compat.state_fetch import (
    StateFetchOps,
    banned_signing_keys,
    install_state_ids_reuse,
)
from synapse_partial_state.compat.state_group_deltas import (
    install_state_group_deltas,
)
from synapse_partial_state.compat.state_resolution import (
    install_identical_state_shortcut,
)
from synapse_partial_state.compat.sync import install_syncing_signal
from synapse_partial_state.compat.web import (
    mount_admin_api,
    mount_client_api,
    on_client_listeners,
)
from synapse_partial_state.config import PartialStateConfig, parse_config
from synapse_partial_state.device_lists.lists import DeviceLists
from synapse_partial_state.joining.engine import ResyncEngine
from synapse_partial_state.joining.fetch import StateFetcher
from synapse_partial_state.joining.inflight import InflightFetches
from synapse_partial_state.joining.join_check import JoinCheck
from synapse_partial_state.joining.keys import JoinKeyPrefetch
from synapse_partial_state.joining.metrics import ResyncMetrics
from synapse_partial_state.joining.store import JobStore
from synapse_partial_state.joining.verify import VerifierPool, default_workers
from synapse_partial_state.resident.fanout import FanOutHold
from synapse_partial_state.resident.metrics import StateServerMetrics
from synapse_partial_state.resident.send_join import SendJoinEnricher
from synapse_partial_state.resident.state import StateServer
from synapse_partial_state.resident.warm import JoinedHostsWarmer
from synapse_partial_state.status import STATUS_PATH, StatusResource

logger = logging.getLogger(__name__)


class PartialStateModule:
    """The Synapse module: validates its config, installs its hooks, logs its role."""

    def __init__(self, config: PartialStateConfig, api: ModuleApi) -> None:
        self._api = api
        self._config = config
        # On an untested Synapse: no patch, no engine (Synapse runs as stock), only
        # the status endpoint and the admin API, which say so.
        self.gate = patching.check_synapse_version(
            config.allow_untested_synapse, config.refuse_untested_synapse
        )
        # Synapse runs remote joins and resyncs on the main process only
        # (do_invite_join asserts it), so that is where the engine lives.
        is_main = api.worker_app is None
        self.engine: ResyncEngine | None = None
        self.device_lists: DeviceLists | None = None
        #: The bulk writers' verdict, where the engine's state fetch runs.
        self.bulk_gate: BulkGate | None = None
        if self.gate.patches_active:
            self.engine = self._install_patches(api, config, is_main)
        api.register_web_resource(
            STATUS_PATH,
            on_client_listeners(
                api,
                StatusResource(api, config, __version__, self.gate, self.bulk_gate),
            ),
        )
        mount_admin_api(AdminApi(api, self.engine, self.gate).routes())
        self._log_role(is_main)

    def _install_patches(
        self, api: ModuleApi, config: PartialStateConfig, is_main: bool
    ) -> ResyncEngine | None:
        """Every patch this process needs, and the engine on the main process."""
        # Wherever this process resolves state (resident, joiner, persister).
        install_identical_state_shortcut(api)
        # Wherever this process takes in events with missing prev events.
        install_fast_prev_state()
        # Wherever this process stores state groups.
        install_state_group_deltas(api)
        # Wherever this process persists events (current state included).
        install_current_state_guard(api)
        # The bulk writers' release check, once (it warns on an untested one).
        release = bulk_gate.release_verdict()
        install_bulk_finish(
            api, bulk_gate.configured(release, config.resync.bulk_finish)
        )
        # Wherever Synapse's user directory, stats or presence handle deltas.
        deltas_verdict = bulk_gate.configured(release, config.resync.bulk_state_deltas)
        if install_delta_batching(deltas_verdict):
            clock = patching.homeserver(api).get_clock()
            install_shared_delta_reads(
                patching.main_store(api),
                lambda seconds, callback: call_later_s(clock, seconds, callback),
            )
        # Wherever this process serves the client API (main or workers).
        summaries = self._wire_clients(api, config)
        if config.resident.enabled:
            self._wire_resident(api, config)
        # Wherever this process writes device lists (the main process unless
        # stream_writers.device_lists names workers).
        self.device_lists = DeviceLists.install(api)
        if not is_main:
            return None
        # The bulk signature checks, of the state at a join and of the join's
        # own /send_join answer.
        pool = None
        if config.resync.enabled and config.resync.fast_state_fetch:
            workers = config.resync.verify_workers
            pool = VerifierPool(
                default_workers() if workers < 0 else workers, banned_signing_keys()
            )
        # Synapse joins remote rooms on the main process only.
        self._wire_join(api, pool, config.resync.essentials_key_wait_seconds)
        if config.resync.enabled:
            engine = self._wire_engine(api, config, pool, release)
            if self.device_lists is not None:
                engine.add_abandon_listener(
                    self.device_lists.on_room_abandoned,
                    before_purge=self.device_lists.before_purge,
                )
            engine.add_complete_listener(summaries.forget)
            engine.add_abandon_listener(summaries.forget)
            engine.add_complete_listener(
                functools.partial(memory.release_after_resync, api)
            )
            return engine
        return None

    @staticmethod
    def _wire_clients(api: ModuleApi, config: PartialStateConfig) -> JoinSummaries:
        """The syncing signal in ``/sync``, the progress endpoint (reading the
        job table, which any process can), members and space children read from
        partial state."""
        install_syncing_signal(
            syncing.resynced_rooms,
            syncing.syncing_flag,
            syncing.mark_room,
            syncing.ToldSyncing().flag,
        )
        jobs = JobStore(api)
        summaries = JoinSummaries(api, jobs)
        install_join_summary_capture(summaries.on_summary)
        ops = ClientOps(api, summaries)
        members = MembersDuringResync(config.clients, ops)
        install_partial_reads(
            members.answers_at_once,
            members.mark,
            config.clients.history_wait_seconds,
        )
        install_backfill(patching.homeserver(api))
        endpoint = PartialStateEndpoint(api, ops, jobs)
        mount_client_api(endpoint.routes())
        return summaries

    @staticmethod
    def _wire_resident(api: ModuleApi, config: PartialStateConfig) -> None:
        """Partial ``/send_join`` essentials, and the ``/state`` server."""
        enricher = SendJoinEnricher(api, config.resident)
        send_join.install_send_join_hooks(
            enricher.extras_for, enricher.select, enricher.response_fields
        )
        install_signing_servers_hint(enricher.signing_servers)
        install_make_join_reads(api)
        hold_s = config.resident.fanout_hold_seconds
        hold = None
        if hold_s > 0:
            hold = send_join.install_fanout_hold(
                api, lambda wake, later, pos: FanOutHold(wake, later, hold_s, pos)
            )
        server = None
        if config.resident.state_cache.enabled:
            server = StateServer(
                api,
                config.resident.state_cache,
                metrics=StateServerMetrics(api.server_name),
            )
            # With the hold: a joiner's first state requests before its
            # join's fan-out.
            servlets.install_state_servlets(
                server.serve_state,
                server.serve_state_ids,
                hold.answer_started if hold is not None else None,
                send_join.NEXT_REQUEST_GRACE_S,  # the /state follows a /state_ids
            )
            install_event_invalidation_hook(
                api, server.forget_event, server.forget_room
            )
            send_join.install_partial_join_observer(server.after_partial_join)
        if config.resident.warm_hosts_min_members > 0 and handles_federation(api):
            warmer = JoinedHostsWarmer(
                JoinedHostsOps(api),
                config.resident.warm_hosts_min_members,
                then=(
                    server.prepare_room
                    if server is not None and serves_federation(api)
                    else None
                ),
            )
            install_un_partial_observer(api, warmer.on_room_resynced)
            warmer.start()

    @staticmethod
    def _wire_join(
        api: ModuleApi, pool: VerifierPool | None, essentials_wait_s: float
    ) -> None:
        """The join itself: the signing keys a module resident's ``/make_join``
        answer names, fetched while it prepares the ``/send_join`` answer, and
        that answer checked in bulk (with ``pool``; without, by Synapse)."""
        prefetch = JoinKeyPrefetch(
            api,
            ResyncOps(api),
            lambda servers, at_ms: servers_with_stored_keys(api, servers, at_ms),
        )
        check = JoinCheck(
            prefetch,
            pool,
            StateFetchOps(api) if pool else None,
            api.server_name,
            essentials_wait_s,
        )
        install_join_key_prefetch(api, prefetch.on_hint, check.before_check)

    def _wire_engine(
        self,
        api: ModuleApi,
        config: PartialStateConfig,
        pool: VerifierPool | None,
        release: BulkGate,
    ) -> ResyncEngine:
        """The resync engine, its own state fetch (with ``pool``, when
        ``fast_state_fetch``), and Synapse's hooks into both."""
        fetcher = None
        if pool is not None:
            inflight = InflightFetches()
            install_state_ids_reuse(
                api, skip_reuse_while_backfilling(inflight.answer_for)
            )
            self.bulk_gate = bulk_gate.configured(release, config.resync.bulk_writer)
            bulk = bulk_outlier_writer(patching.homeserver(api), self.bulk_gate)
            if bulk is not None:
                install_join_outliers(bulk)
            fetcher = StateFetcher(StateFetchOps(api, bulk), pool, inflight)
        engine = ResyncEngine(
            api,
            config.resync,
            ResyncOps(api),
            ResyncMetrics(api.server_name),
            fetcher,
        )
        install_resync_hook(engine.sync_room)
        install_local_membership_observer(api, engine.on_local_membership)
        return engine

    def _log_role(self, is_main: bool) -> None:
        config, api = self._config, self._api
        if not self.gate.patches_active:
            logger.info(
                "synapse_partial_state %s loaded on the %s with every patch off "
                "(untested Synapse %s): Synapse runs as stock",
                __version__,
                "main process" if is_main else f"worker {api.worker_name}",
                self.gate.synapse_version,
            )
            return
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
            ", ".join(p.target.rsplit(".", 1)[-1] for p in patching.INSTALLED_PATCHES)
            or "none",
        )

    @staticmethod
    def parse_config(config: Any) -> PartialStateConfig:
        return parse_config(config)
