"""Where the module's endpoints answer: the admin API inside Synapse's admin
resource, and the listeners that serve the client API."""

from __future__ import annotations

import re
import unittest
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

from synapse.config.server import (
    HttpListenerConfig,
    HttpResourceConfig,
    TCPListenerConfig,
    UnixListenerConfig,
)
from synapse.module_api import ModuleApi
from synapse.rest import admin as synapse_admin

from synapse_partial_state.compat import patching, web


def _http(port: int, *names: str, tag: str | None = None) -> TCPListenerConfig:
    return TCPListenerConfig(
        port=port,
        bind_addresses=["127.0.0.1"],
        type="http",
        http_options=HttpListenerConfig(
            resources=[HttpResourceConfig(names=list(names))], tag=tag
        ),
    )


def _api(listeners: list[Any], worker_app: str | None = None) -> ModuleApi:
    config = SimpleNamespace(
        server=SimpleNamespace(listeners=[] if worker_app else listeners),
        worker=SimpleNamespace(
            worker_app=worker_app, worker_listeners=listeners if worker_app else []
        ),
    )
    return cast(ModuleApi, SimpleNamespace(_hs=SimpleNamespace(config=config)))


class ClientSiteTagsTests(unittest.TestCase):
    def test_only_listeners_serving_client(self) -> None:
        api = _api(
            [
                _http(8448, "federation", "keys", "openid"),
                _http(8008, "client", "federation"),
                _http(9000, "metrics"),
                _http(9093, "replication"),
                TCPListenerConfig(port=9001, bind_addresses=[], type="manhole"),
            ]
        )
        self.assertEqual(web.client_site_tags(api), {"8008"})

    def test_worker_listeners_on_a_worker(self) -> None:
        api = _api([_http(8083, "client"), _http(8084, "federation")], "w")
        self.assertEqual(web.client_site_tags(api), {"8083"})

    def test_a_tag_shared_with_a_federation_only_listener_is_not_served(
        self,
    ) -> None:
        api = _api(
            [
                _http(8008, "client", tag="public"),
                _http(8448, "federation", tag="public"),
                _http(8009, "client", tag="internal"),
                _http(8010, "client", tag="internal"),
            ]
        )
        self.assertEqual(web.client_site_tags(api), {"internal"})

    def test_unix_sockets_share_one_tag(self) -> None:
        unix = UnixListenerConfig(
            path="/run/a.sock",
            mode=0o666,
            type="http",
            http_options=HttpListenerConfig(
                resources=[HttpResourceConfig(names=["client"])]
            ),
        )
        self.assertEqual(web.client_site_tags(_api([unix])), {"unix"})

    def test_request_site_tag(self) -> None:
        request: Any = SimpleNamespace(synapse_site=SimpleNamespace(site_tag="8008"))
        self.assertEqual(web.request_site_tag(request), "8008")
        self.assertIsNone(web.request_site_tag(cast(Any, SimpleNamespace())))


class MountAdminApiTests(unittest.TestCase):
    def setUp(self) -> None:
        # Synapse's function, as a spy (a plain function: a Mock would claim to
        # be wrapped already, as it has every attribute).
        self.calls: list[tuple[Any, Any]] = []

        def native(hs: Any, http_server: Any) -> None:
            self.calls.append((hs, http_server))

        patcher = mock.patch.object(synapse_admin, "register_servlets", native)
        patcher.start()
        self.addCleanup(patcher.stop)
        routes, mounts = list(web._ADMIN_ROUTES), list(patching.INSTALLED_MOUNTS)

        def restore() -> None:
            web._ADMIN_ROUTES[:] = routes
            patching.INSTALLED_MOUNTS[:] = mounts

        self.addCleanup(restore)

    async def _list(self, request: Any) -> tuple[int, dict]:
        return 200, {}

    def _routes(self, name: str) -> list[web.AdminRoute]:
        return [
            web.AdminRoute("GET", "/v1/partial_state/rooms/?$", self._list, name),
            web.AdminRoute(
                "POST", "/v1/partial_state/rooms/(?P<r>[^/]+)/x$", self._list, name
            ),
        ]

    def test_routes_join_synapses_admin_resource_after_its_own(self) -> None:
        self.assertTrue(web.mount_admin_api(self._routes("Rooms")))
        http_server = mock.Mock(name="JsonResource")
        hs: Any = object()
        synapse_admin.register_servlets(hs, http_server)

        self.assertEqual(self.calls, [(hs, http_server)])
        calls = http_server.register_paths.call_args_list
        self.assertEqual(
            [(c.args[0], [p.pattern for p in c.args[1]], c.args[3]) for c in calls],
            [
                ("GET", ["^/_synapse/admin/v1/partial_state/rooms/?$"], "Rooms"),
                (
                    "POST",
                    ["^/_synapse/admin/v1/partial_state/rooms/(?P<r>[^/]+)/x$"],
                    "Rooms",
                ),
            ],
        )
        match = re.match(
            calls[1].args[1][0], "/_synapse/admin/v1/partial_state/rooms/%21a/x"
        )
        self.assertEqual(match and match.groupdict(), {"r": "%21a"})

    def test_mounting_again_replaces_the_routes_without_wrapping_twice(self) -> None:
        web.mount_admin_api(self._routes("First"))
        wrapped = synapse_admin.register_servlets
        web.mount_admin_api(self._routes("Second"))
        self.assertIs(synapse_admin.register_servlets, wrapped)
        http_server = mock.Mock()
        synapse_admin.register_servlets(cast(Any, None), http_server)
        self.assertEqual(len(self.calls), 1)
        names = {c.args[3] for c in http_server.register_paths.call_args_list}
        self.assertEqual(names, {"Second"})

    def test_a_failing_registration_leaves_synapses_admin_api(self) -> None:
        web.mount_admin_api(self._routes("Rooms"))
        http_server = mock.Mock()
        http_server.register_paths.side_effect = TypeError("new signature")
        with self.assertLogs(web.logger, "ERROR"):
            synapse_admin.register_servlets(cast(Any, None), http_server)
        self.assertEqual(len(self.calls), 1)
