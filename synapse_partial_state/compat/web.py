"""The web seam: where the module's HTTP endpoints answer.

Synapse's module API (``register_web_resource``) attaches a resource to *every* HTTP
listener, federation-only ones included (``SynapseHomeServer._listener_http`` and
``GenericWorkerServer._listen_http`` add ``_module_web_resources`` to each listener's
tree; checked in 1.163.2), and cannot place one under ``/_synapse/admin``: that
prefix is Synapse's admin ``JsonResource``, a leaf that routes by regular expression
and never reaches child resources. Synapse serves its admin API on the listeners
that serve the ``client`` resource (there is no ``admin`` resource name in 1.163),
so the module's endpoints follow that rule:

* the admin API is registered into Synapse's own admin ``JsonResource``
  (:func:`mount_admin_api`), by wrapping ``synapse.rest.admin.register_servlets``,
  which Synapse calls once per listener serving ``client`` while it builds that
  listener (after modules are created): the routes exist exactly where Synapse's
  admin API does, with its error format, CORS and metrics;
* the status endpoint stays a module web resource, wrapped so that it answers only
  on listeners whose config lists ``client`` (:func:`on_client_listeners`) and
  answers elsewhere exactly as an unknown path does.

Neither changes what Synapse does: they add routes. They are recorded as mounts
(:data:`~.patching.INSTALLED_MOUNTS`), apart from the patches, and installed even
when the version gate turns every patch off, so that the status endpoint and the
admin API can say so.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attr
from synapse.module_api import ModuleApi
from twisted.web.resource import Resource

from synapse_partial_state.compat.patching import PatchRecord, homeserver, record_mount

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

logger = logging.getLogger(__name__)

#: Synapse's admin prefix: what its admin ``JsonResource`` is mounted at.
SYNAPSE_ADMIN_PREFIX = "/_synapse/admin"

_REGISTER_TARGET = "synapse.rest.admin.register_servlets"


@attr.s(frozen=True, auto_attribs=True, slots=True)
class AdminRoute:
    """One endpoint of the module's admin API, as Synapse's admin resource routes it."""

    #: ``GET``, ``POST``...
    method: str
    #: Regular expression of the path after :data:`SYNAPSE_ADMIN_PREFIX`, anchored
    #: at its start (e.g. ``/v1/partial_state/rooms/?$``); named groups are passed
    #: to ``callback`` as keyword arguments, URL-decoded.
    path: str
    #: ``callback(request, **groups)`` returning ``(status, JSON body)``.
    callback: Callable[..., Awaitable[tuple[int, dict[str, Any]]]]
    #: The name Synapse labels the request's metrics and traces with.
    name: str


#: The routes the wrapped ``register_servlets`` adds (the latest mount's).
_ADMIN_ROUTES: list[AdminRoute] = []


def mount_admin_api(routes: Sequence[AdminRoute]) -> bool:
    """Serve ``routes`` under ``/_synapse/admin`` on every listener where Synapse
    serves its own admin API. Must run before Synapse starts listening (module
    creation does). False, with an error logged, if this Synapse has no such seam:
    the server then starts without the module's admin API."""
    try:
        from synapse.rest import admin as synapse_admin

        native = synapse_admin.register_servlets
    except (ImportError, AttributeError):
        logger.error(
            "synapse_partial_state: this Synapse has no %s; the module's admin API "
            "is not served",
            _REGISTER_TARGET,
        )
        return False
    _ADMIN_ROUTES[:] = list(routes)
    if not getattr(native, "_sps_wrapped", False):

        @functools.wraps(native)
        def register_servlets(hs: Any, http_server: Any) -> None:
            native(hs, http_server)
            _register_admin_routes(http_server)

        register_servlets._sps_wrapped = True  # type: ignore[attr-defined]
        synapse_admin.register_servlets = register_servlets
    record_mount(
        PatchRecord(
            _REGISTER_TARGET,
            "wrap (adds routes)",
            "the module's admin API inside Synapse's admin resource "
            "(/_synapse/admin/v1/partial_state/...), on client listeners only",
        )
    )
    return True


def _register_admin_routes(http_server: Any) -> None:
    """Add the module's routes to one listener's admin ``JsonResource``; an error is
    logged and leaves Synapse's own admin API as it is."""
    try:
        for route in _ADMIN_ROUTES:
            http_server.register_paths(
                route.method,
                [re.compile("^" + SYNAPSE_ADMIN_PREFIX + route.path)],
                route.callback,
                route.name,
            )
    except Exception:
        logger.exception(
            "synapse_partial_state: could not add the admin API to a listener's "
            "admin resource; Synapse's own admin API is unaffected"
        )


def client_site_tags(api: ModuleApi) -> frozenset[str]:
    """The site tags of this process's HTTP listeners that serve the client API.

    A request knows its listener only by the site tag (``SynapseSite.site_tag``:
    the listener's ``tag``, else its port; ``unix`` for every UNIX socket), which
    several listeners may share: a tag counts only if *every* HTTP listener carrying
    it serves ``client``, so that a shared tag never exposes the endpoints on a
    federation-only listener."""
    config = homeserver(api).config
    listeners: Iterable[Any] = (
        config.server.listeners
        if config.worker.worker_app is None
        else config.worker.worker_listeners
    )
    serves: dict[str, bool] = {}
    for listener in listeners:
        if listener.type != "http" or listener.http_options is None:
            continue
        client = any("client" in r.names for r in listener.http_options.resources)
        tag = listener.get_site_tag()
        serves[tag] = serves.get(tag, True) and client
    return frozenset(tag for tag, client in serves.items() if client)


def request_site_tag(request: SynapseRequest) -> str | None:
    """The site tag of the listener ``request`` arrived on (None if unknown)."""
    site = getattr(request, "synapse_site", None)
    tag = getattr(site, "site_tag", None)
    return tag if isinstance(tag, str) else None


class _OnClientListeners(Resource):
    """``inner`` on listeners serving the client API; elsewhere an unknown path."""

    def __init__(self, inner: Resource, tags: frozenset[str]) -> None:
        super().__init__()
        self._inner = inner
        self._tags = tags

    def _here(self, request: SynapseRequest) -> bool:
        return request_site_tag(request) in self._tags

    def render(self, request: SynapseRequest) -> Any:  # type: ignore[override]
        if self._here(request):
            return self._inner.render(request)
        return _unrecognised().render(request)

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        if self._here(request):
            return self._inner.getChildWithDefault(path, request)
        return _unrecognised()


def _unrecognised() -> Resource:
    """Synapse's answer to an unknown path: 404 ``M_UNRECOGNIZED``."""
    from synapse.http.server import UnrecognizedRequestResource

    return UnrecognizedRequestResource()


def on_client_listeners(api: ModuleApi, resource: Resource) -> Resource:
    """``resource``, answering only on listeners that serve the client API (where
    Synapse serves ``/_synapse/client`` and its admin API); on the others (e.g.
    federation-only listeners) the path answers 404 as if it did not exist. If the
    listener config cannot be read, it answers nowhere (and says so in the log)."""
    try:
        tags = client_site_tags(api)
    except Exception:
        logger.exception(
            "synapse_partial_state: cannot read this process's listeners; the "
            "status endpoint is not served"
        )
        tags = frozenset()
    record_mount(
        PatchRecord(
            "synapse.http.site.SynapseSite.site_tag",
            "read (with the listeners' config)",
            "the status endpoint answers only on listeners serving the client API "
            f"(here: {', '.join(sorted(tags)) or 'none'})",
        )
    )
    return _OnClientListeners(resource, tags)
