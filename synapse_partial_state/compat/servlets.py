"""The federation-servlet seam: servlets that know the request they serve, the
module's ``/state`` and ``/state_ids`` servlets, and Synapse's way of writing a
JSON body in blocks."""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attr

from synapse_partial_state.compat.patching import PatchRecord, record_patch
from synapse_partial_state.wire import MEMBERS_ONLY_PARAM

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

logger = logging.getLogger(__name__)

#: The request a patched federation servlet is serving in this task: set by the
#: servlet's ``_wrap`` before Synapse authenticates the request, read by the
#: handlers below it (which Synapse calls with the parsed request, never the
#: request itself).
FEDERATION_REQUEST: contextvars.ContextVar[SynapseRequest | None] = (
    contextvars.ContextVar("sps_federation_request", default=None)
)


def request_aware_servlet(
    native: type[Any], track: AnswerTracker | None = None, grace_s: float = 0.0
) -> type[Any]:
    """A subclass of the federation servlet class ``native``, of the same name (Synapse
    labels its request metrics and traces with it), whose handlers run with the
    request in :data:`FEDERATION_REQUEST`.

    It overrides only ``BaseFederationServlet._wrap`` (checked in 1.163.2), and keeps
    everything it does (signature check, origin, per-origin rate limit, tracing).
    With ``track`` (the fan-out hold's ``answer_started``), each request counts
    as an answer in progress from its arrival (before the signature check,
    which may wait for the origin's keys) until its response has been written,
    and ``grace_s`` longer."""

    def with_request(inner: Callable[..., Awaitable[Any]]) -> Any:
        @functools.wraps(inner)
        async def wrapped(request: SynapseRequest, *args: Any, **kwargs: Any) -> Any:
            token = FEDERATION_REQUEST.set(request)
            finished = track() if track is not None else None
            try:
                return await inner(request, *args, **kwargs)
            finally:
                if finished is not None:
                    done = finished
                    after_response(
                        lambda: done(grace_s), f"{native.__name__} answer tracking"
                    )
                FEDERATION_REQUEST.reset(token)

        return wrapped

    class Servlet(native):  # type: ignore[valid-type,misc]
        def _wrap(self, func: Callable[..., Awaitable[tuple[int, Any]]]) -> Any:
            return with_request(super()._wrap(func))

    Servlet.__name__ = Servlet.__qualname__ = native.__name__
    return Servlet


def replace_federation_servlets(replacements: Mapping[type[Any], type[Any]]) -> None:
    """Put ``replacements`` in ``SERVLET_GROUPS["federation"]`` in place of their
    keys. ``register_servlets`` reads that dict when a federation listener (main
    process or worker) builds its ``TransportLayerServer``, in
    ``hs.start_listening()``, which runs after modules are created: every listener
    gets the replacements."""
    from synapse.federation.transport import server as transport_server

    group = tuple(transport_server.SERVLET_GROUPS["federation"])
    transport_server.SERVLET_GROUPS["federation"] = tuple(
        replacements.get(cls, cls) for cls in group
    )


def after_response(callback: Callable[[], None], what: str) -> None:
    """Call ``callback`` once the response to the federation request being served
    in this task has been written (at once if that request is unknown); its errors
    are logged and swallowed."""

    def call(_: object = None) -> None:
        try:
            callback()
        except Exception:
            logger.exception("%s failed", what)

    request = FEDERATION_REQUEST.get()
    if request is None or _over(request):
        call()
    else:
        # Fires on finish() (the whole body handed to the connection) or when
        # the connection is lost.
        request.notifyFinish().addBoth(call)


def _over(request: Any) -> bool:
    """Whether ``request`` has finished or lost its connection already (a
    Twisted request's ``notifyFinish()`` asked after that never fires)."""
    return bool(getattr(request, "finished", False)) or bool(
        getattr(request, "_disconnected", False)
    )


@attr.s(frozen=True, auto_attribs=True, slots=True)
class StateQuery:
    """One authenticated ``/state`` or ``/state_ids`` request, parsed as Synapse does."""

    origin: str
    room_id: str
    event_id: str
    #: ``org.matrix.msc2775.members_only=true`` (``/state`` only).
    members_only: bool = False


#: Serves a request by writing the response itself (True), or declines (False)
#: and lets Synapse's own servlet answer. Raising a ``SynapseError`` answers
#: with that error, as Synapse's servlets do.
ServeStateRequest = Callable[["SynapseRequest", StateQuery], Awaitable[bool]]
#: Called as an answer starts; what it returns is called once the answer has
#: been sent (or has failed), with how much longer it should count as in
#: progress (``grace_s``): the fan-out hold's ``answer_started``.
AnswerTracker = Callable[[], Callable[..., None]]


def install_state_servlets(
    serve_state: ServeStateRequest,
    serve_state_ids: ServeStateRequest,
    track: AnswerTracker | None = None,
    ids_grace_s: float = 0.0,
) -> None:
    """Serve ``GET /_matrix/federation/v1/state{,_ids}/{roomId}`` through the module.

    Replaces ``FederationStateV1Servlet`` and ``FederationStateIdsServlet`` (only
    type-hint changes since 1.100; checked in 1.163.2) in
    ``synapse.federation.transport.server.SERVLET_GROUPS["federation"]`` with
    subclasses of the same names (see :func:`replace_federation_servlets`).

    The subclasses are request-aware (:func:`request_aware_servlet`), because
    ``on_GET`` is called with the query, not the request. ``on_GET`` parses
    ``event_id`` exactly as
    Synapse does (400 ``M_MISSING_PARAM`` when absent) and hands over to the
    module, which writes the response itself and returns None (the documented
    "already handled" return of ``BaseFederationServlet`` callbacks), or declines:
    then the stock ``on_GET`` answers, as if the module were not there.

    With ``track``, each request counts as an answer in progress for the fan-out
    hold from its arrival until its response has been written (and a
    ``/state_ids`` answer ``ids_grace_s`` longer: its ``/state`` follows), see
    :func:`request_aware_servlet`.
    """
    from synapse.federation.transport import server as transport_server
    from synapse.federation.transport.server import federation as fed_servlets

    group = tuple(transport_server.SERVLET_GROUPS["federation"])
    if any(getattr(cls, "_sps_state_servlet", False) for cls in group):
        return
    native_state = fed_servlets.FederationStateV1Servlet
    native_state_ids = fed_servlets.FederationStateIdsServlet

    replace_federation_servlets(
        {
            native_state: _module_state_servlet(
                native_state, serve_state, True, track, 0.0
            ),
            native_state_ids: _module_state_servlet(
                native_state_ids, serve_state_ids, False, track, ids_grace_s
            ),
        }
    )
    record_patch(
        PatchRecord(
            "synapse.federation.transport.server.SERVLET_GROUPS[federation]"
            ".FederationStateV1Servlet",
            "replace",
            "serve /state from the module's state-group cache, streamed; "
            "MSC2775 members-only variant",
        )
    )
    record_patch(
        PatchRecord(
            "synapse.federation.transport.server.SERVLET_GROUPS[federation]"
            ".FederationStateIdsServlet",
            "replace",
            "serve /state_ids from the module's state-group cache",
        )
    )


def _module_state_servlet(
    native: type[Any],
    serve: ServeStateRequest,
    members_only_variant: bool,
    track: AnswerTracker | None,
    grace_s: float,
) -> type[Any]:
    """A subclass of ``native`` of the same name, served by ``serve`` (see
    :func:`install_state_servlets`)."""
    from synapse.http.servlet import parse_boolean_from_args, parse_string_from_args

    class Servlet(request_aware_servlet(native, track, grace_s)):  # type: ignore[misc]
        _sps_state_servlet = True

        async def on_GET(
            self,
            origin: str,
            content: None,
            query: dict[bytes, list[bytes]],
            room_id: str,
        ) -> tuple[int, Any] | None:
            request = FEDERATION_REQUEST.get()
            event_id = parse_string_from_args(query, "event_id", None, required=True)
            members_only = members_only_variant and parse_boolean_from_args(
                query, MEMBERS_ONLY_PARAM, False
            )
            if request is not None and await serve(
                request, StateQuery(origin, room_id, event_id, members_only)
            ):
                return None
            return await super().on_GET(origin, content, query, room_id)

    Servlet.__name__ = Servlet.__qualname__ = native.__name__
    return Servlet


def encode_federation_json(value: Any) -> bytes:
    """Synapse's federation response encoding (``JsonResource(canonical_json=False)``)."""
    from synapse.util.json import json_encoder

    return json_encoder.encode(value).encode("utf-8")


def write_json_response(
    request: SynapseRequest, length: int, chunks: Iterator[bytes]
) -> None:
    """Write a 200 JSON body of ``length`` bytes from ``chunks``, as Synapse does.

    The headers of ``respond_with_json_bytes`` (Content-Type, Content-Length,
    Cache-Control unless set, CORS as ``JsonResource`` sends), then Synapse's own
    push producer (``synapse.http.server._ByteProducer``, 1.163.2), which pulls the
    chunks lazily, pauses on back-pressure and finishes the request, so the body is
    never joined in memory."""
    from synapse.http.server import _ByteProducer, set_cors_headers

    request.setResponseCode(200)
    if request._disconnected:
        logger.info("Not sending response to %s: already disconnected", request)
        return
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % (length,))
    if not request.responseHeaders.hasHeader(b"Cache-Control"):
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    set_cors_headers(request)
    _ByteProducer(request, chunks)
