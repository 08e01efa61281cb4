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


class MountClientApiTests(unittest.TestCase):
    def setUp(self) -> None:
        from synapse import rest as synapse_rest

        self.rest = synapse_rest
        group = synapse_rest.SERVLET_GROUPS["client"]
        routes, mounts = list(web._CLIENT_ROUTES), list(patching.INSTALLED_MOUNTS)

        def restore() -> None:
            synapse_rest.SERVLET_GROUPS["client"] = group
            web._CLIENT_ROUTES[:] = routes
            patching.INSTALLED_MOUNTS[:] = mounts

        self.addCleanup(restore)
        # Synapse's own group, as before any mount.
        synapse_rest.SERVLET_GROUPS["client"] = tuple(
            f for f in group if f is not web._register_client_routes
        )

    def _ours(self) -> Any:
        return tuple(self.rest.SERVLET_GROUPS["client"])[-1]

    async def _get(self, request: Any, room_id: str) -> tuple[int, dict]:
        return 200, {}

    def _routes(self, name: str) -> list[web.ClientRoute]:
        return [
            web.ClientRoute(
                "GET",
                r"/unstable/org\.matrix\.msc2775/rooms/(?P<room_id>[^/]*)/partial_state$",
                self._get,
                name,
            )
        ]

    def test_added_to_synapses_client_servlet_group_once(self) -> None:
        native = tuple(self.rest.SERVLET_GROUPS["client"])
        self.assertTrue(web.mount_client_api(self._routes("First")))
        self.assertTrue(web.mount_client_api(self._routes("Second")))
        group = tuple(self.rest.SERVLET_GROUPS["client"])
        # Synapse's own servlets first, unchanged; ours once, last
        self.assertEqual(group, (*native, web._register_client_routes))
        targets = [m.target for m in patching.INSTALLED_MOUNTS]
        self.assertEqual(targets.count("synapse.rest.SERVLET_GROUPS[client]"), 1)

    def test_routes_join_each_client_resource_under_the_client_prefix(self) -> None:
        web.mount_client_api(self._routes("First"))
        web.mount_client_api(self._routes("PartialState"))
        http_server = mock.Mock(name="ClientRestResource")
        self._ours()(cast(Any, None), http_server)
        (call,) = http_server.register_paths.call_args_list
        self.assertEqual(call.args[0], "GET")
        self.assertEqual(call.args[3], "PartialState")
        (pattern,) = call.args[1]
        match = pattern.match(
            "/_matrix/client/unstable/org.matrix.msc2775/rooms/%21r%3Ax/partial_state"
        )
        self.assertEqual(match and match.groupdict(), {"room_id": "%21r%3Ax"})
        self.assertIsNone(
            pattern.match(
                "/_synapse/admin/unstable/org.matrix.msc2775/rooms/r/partial_state"
            )
        )

    def test_a_failing_registration_leaves_synapses_client_api(self) -> None:
        web.mount_client_api(self._routes("PartialState"))
        http_server = mock.Mock()
        http_server.register_paths.side_effect = TypeError("new signature")
        with self.assertLogs(web.logger, "ERROR"):
            self._ours()(cast(Any, None), http_server)
