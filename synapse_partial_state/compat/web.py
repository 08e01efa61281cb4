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
  answers elsewhere exactly as an unknown path does;
* the client API (``/_matrix/client/unstable/org.matrix.msc2775/...``) lives under
  ``/_matrix/client``, which is Synapse's client ``JsonResource`` (a leaf too: a
  module web resource below it would never be reached), so it is registered into
  it (:func:`mount_client_api`): a function added to Synapse's ``client`` servlet
  group (``synapse.rest.SERVLET_GROUPS``), which ``ClientRestResource`` calls for
  every listener serving ``client``, on the main process and on workers alike.

None changes what Synapse does: they add routes. They are recorded as mounts
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


#: Synapse's client API prefix: what its client ``JsonResource`` is mounted at.
CLIENT_API_PREFIX = "/_matrix/client"

_CLIENT_GROUP_TARGET = "synapse.rest.SERVLET_GROUPS[client]"


@attr.s(frozen=True, auto_attribs=True, slots=True)
class AdminRoute:
    """One endpoint of the module's admin API or client API, as Synapse's
    ``JsonResource`` routes it."""

    #: ``GET``, ``POST``...
    method: str
    #: Regular expression of the path after the prefix it is mounted under
    #: (:data:`SYNAPSE_ADMIN_PREFIX` or :data:`CLIENT_API_PREFIX`), anchored at
    #: its start (e.g. ``/v1/partial_state/rooms/?$``); named groups are passed
    #: to ``callback`` as keyword arguments, URL-decoded.
    path: str
    #: ``callback(request, **groups)`` returning ``(status, JSON body)``.
    callback: Callable[..., Awaitable[tuple[int, dict[str, Any]]]]
    #: The name Synapse labels the request's metrics and traces with.
    name: str


#: A route of the client API (same shape; see :func:`mount_client_api`).
ClientRoute = AdminRoute

#: The routes the wrapped ``register_servlets`` adds (the latest mount's).
_ADMIN_ROUTES: list[AdminRoute] = []

#: The routes the client servlet group's added function registers (the latest
#: mount's).
_CLIENT_ROUTES: list[ClientRoute] = []


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


def _register_routes(
    http_server: Any, prefix: str, routes: Sequence[AdminRoute], what: str
) -> None:
    """Add ``routes`` to one listener's ``JsonResource`` under ``prefix``; an error
    is logged and leaves Synapse's own API (``what``) as it is."""
    try:
        for route in routes:
            http_server.register_paths(
                route.method,
                [re.compile("^" + prefix + route.path)],
                route.callback,
                route.name,
            )
    except Exception:
        logger.exception(
            "synapse_partial_state: could not add the module's routes to a "
            "listener's %s resource; Synapse's own is unaffected",
            what,
        )


def _register_admin_routes(http_server: Any) -> None:
    _register_routes(http_server, SYNAPSE_ADMIN_PREFIX, _ADMIN_ROUTES, "admin")


def _register_client_routes(hs: Any, http_server: Any) -> None:
    """The function added to Synapse's ``client`` servlet group."""
    _register_routes(http_server, CLIENT_API_PREFIX, _CLIENT_ROUTES, "client API")


def mount_client_api(routes: Sequence[ClientRoute]) -> bool:
    """Serve ``routes`` under ``/_matrix/client`` wherever Synapse serves its
    client API (listeners with the ``client`` resource, main process and
    workers), inside its client ``JsonResource``: its authentication errors,
    CORS, metrics and 404/405 answers. Must run before Synapse starts listening
    (module creation does). False, with an error logged, if this Synapse has no
    such seam: the server then starts without the module's client API."""
    try:
        from synapse import rest as synapse_rest

        group = tuple(synapse_rest.SERVLET_GROUPS["client"])
    except (ImportError, AttributeError, KeyError, TypeError):
        logger.error(
            "synapse_partial_state: this Synapse has no %s; the module's client "
            "API is not served",
            _CLIENT_GROUP_TARGET,
        )
        return False
    _CLIENT_ROUTES[:] = list(routes)
    if _register_client_routes not in group:
        synapse_rest.SERVLET_GROUPS["client"] = (*group, _register_client_routes)
    record_mount(
        PatchRecord(
            _CLIENT_GROUP_TARGET,
            "extend (adds routes)",
            "the module's client API inside Synapse's client resource "
            "(/_matrix/client/unstable/org.matrix.msc2775/...), on client listeners "
            "only",
        )
    )
    return True


def http_listeners(api: ModuleApi) -> list[Any]:
    """This process's HTTP listeners (the main process's ``listeners`` or a
    worker's ``worker_listeners``), each with its ``http_options``."""
    config = homeserver(api).config
    listeners: Iterable[Any] = (
        config.server.listeners
        if config.worker.worker_app is None
        else config.worker.worker_listeners
    )
    return [
        listener
        for listener in listeners
        if listener.type == "http" and listener.http_options is not None
    ]


def client_site_tags(api: ModuleApi) -> frozenset[str]:
    """The site tags of this process's HTTP listeners that serve the client API.

    A request knows its listener only by the site tag (``SynapseSite.site_tag``:
    the listener's ``tag``, else its port; ``unix`` for every UNIX socket), which
    several listeners may share: a tag counts only if *every* HTTP listener carrying
    it serves ``client``, so that a shared tag never exposes the endpoints on a
    federation-only listener."""
    serves: dict[str, bool] = {}
    for listener in http_listeners(api):
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
