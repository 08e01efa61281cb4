"""One fake homeserver: its name, signing key and TLS listener.

Each fake server listens on its own 127.0.0.1 port (picked by the OS the first
time, reused on restart) so its server name ``127.0.0.1:<port>`` is
self-consistent. Open connections are tracked so that stopping a server also
cuts the keep-alive connections real Synapses hold to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.ssl import ContextFactory
from twisted.protocols.policies import WrappingFactory
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ..certs import TLSFiles
from .keys import ServerKey


class TLSServerContextFactory(ContextFactory):
    """A server context presenting the kit leaf certificate (with chain)."""

    def __init__(self, tls: TLSFiles) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_chain_file(tls.cert_path)
        ctx.use_privatekey_file(tls.key_path)
        ctx.check_privatekey()
        self._ctx = ctx

    def getContext(self) -> SSL.Context:
        return self._ctx


class QuietSite(Site):
    """A Site without per-request access logging or factory start/stop noise."""

    noisy = False

    def log(self, request: HTTPRequest) -> None:
        pass


RequestHandler = Callable[["FakeServer", Request], Any]


class _Dispatch(Resource):
    isLeaf = True

    def __init__(self, server: FakeServer, handler: RequestHandler) -> None:
        super().__init__()
        self._server = server
        self._handler = handler

    def render(self, request: Request) -> Any:
        self._handler(self._server, request)
        return NOT_DONE_YET


class _TrackingFactory(WrappingFactory):
    noisy = False


class FakeServer:
    """A fake homeserver listening on its own TLS port."""

    def __init__(
        self,
        reactor: Any,
        ctx_factory: TLSServerContextFactory,
        handler: RequestHandler,
    ) -> None:
        self._reactor = reactor
        self._ctx_factory = ctx_factory
        self.port = 0
        self.name = ""
        self.key: ServerKey | None = None
        self._listening: Any = None
        self._factory = _TrackingFactory(QuietSite(_Dispatch(self, handler)))

    @property
    def running(self) -> bool:
        """True while the listener accepts connections."""
        return self._listening is not None

    def start(self) -> None:
        """Start listening (first start picks the port and makes the key)."""
        if self._listening is not None:
            return
        self._listening = self._reactor.listenSSL(
            self.port, self._factory, self._ctx_factory, interface="127.0.0.1"
        )
        if not self.port:
            listening: Any = self._listening
            self.port = listening.getHost().port
            self.name = f"127.0.0.1:{self.port}"
            self.key = ServerKey(self.name)

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and abort open connections."""
        listening, self._listening = self._listening, None
        for proto in list(self._factory.protocols):
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.abortConnection()
        if listening is None:
            return defer.succeed(None)
        d = listening.stopListening()
        return d if d is not None else defer.succeed(None)

    def to_json(self) -> dict[str, Any]:
        """Control API representation."""
        return {
            "name": self.name,
            "port": self.port,
            "running": self.running,
            "key_id": self.key.key_id if self.key else None,
            "connections": len(self._factory.protocols),
        }
