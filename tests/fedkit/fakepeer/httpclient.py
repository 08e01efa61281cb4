"""Outgoing federation requests from fake servers, over verified TLS.

Uses Twisted's ``Agent`` directly (rather than treq) so the request URI goes on
the wire byte-for-byte as it was signed in the X-Matrix header.
"""

from __future__ import annotations

import json
import time
from io import BytesIO
from typing import Any
from urllib.parse import quote

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from .keys import ServerKey
from .signing import x_matrix_header


def q(segment: str) -> str:
    """Percent-encode one path segment (room/user/event ids)."""
    return quote(segment, safe="")


@implementer(IPolicyForHTTPS)
class KitCAPolicy:
    """Verify servers against the kit CA only (hostname/IP SAN checked)."""

    def __init__(self, ca_pem_path: str) -> None:
        with open(ca_pem_path, "rb") as f:
            self._root = ssl.Certificate.loadPEM(f.read())

    def creatorForNetloc(
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


class FederationResponse:
    """Status, raw body and timing of one outgoing request."""

    def __init__(self, status: int, body: bytes, seconds: float) -> None:
        self.status = status
        self.body = body
        self.seconds = seconds

    def json(self) -> Any:
        """The body parsed as JSON, or the text if it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace")


class FederationClient:
    """Signed federation requests from any fake server to any server."""

    def __init__(self, reactor: IReactorTime, ca_pem_path: str) -> None:
        self._reactor = reactor
        pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[arg-type]
        pool.maxPersistentPerHost = 16
        pool.cachedConnectionTimeout = 30
        self._pool = pool
        self._agent = Agent(
            reactor,  # type: ignore[arg-type]
            contextFactory=KitCAPolicy(ca_pem_path),
            pool=pool,
            connectTimeout=15,
        )

    async def request(
        self,
        origin: ServerKey | None,
        destination: str,
        method: str,
        uri: str,
        content: Any = None,
        timeout: float = 300.0,
    ) -> FederationResponse:
        """Send ``method uri`` to ``https://destination`` signed by ``origin``.

        ``uri`` is the already-encoded path plus query string. ``origin=None``
        sends an unauthenticated request (e.g. key fetches).
        """
        headers = Headers({b"User-Agent": [b"fedkit-fakepeer"]})
        body_bytes: bytes | None = None
        if content is not None:
            body_bytes = json.dumps(content).encode()
            headers.addRawHeader(b"Content-Type", b"application/json")
        if origin is not None:
            auth = x_matrix_header(
                origin.server_name,
                destination,
                origin.key_id,
                origin.signing_key,
                method,
                uri,
                content,
            )
            headers.addRawHeader(b"Authorization", auth.encode())
        producer: Any = (
            FileBodyProducer(BytesIO(body_bytes)) if body_bytes is not None else None
        )
        url = f"https://{destination}{uri}".encode("ascii")
        started = time.monotonic()
        d = self._agent.request(method.encode("ascii"), url, headers, producer)
        d.addTimeout(timeout, self._reactor)  # type: ignore[arg-type]
        response = await d
        body_d = readBody(response)
        body_d.addTimeout(timeout, self._reactor)  # type: ignore[arg-type]
        body = await body_d
        return FederationResponse(response.code, body, time.monotonic() - started)

    async def close(self) -> None:
        """Close pooled connections."""
        await self._pool.closeCachedConnections()
