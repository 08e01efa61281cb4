"""Handling of every incoming federation request on every fake server.

Parses the X-Matrix header (recording the origin), applies misbehaviour rules,
optionally verifies the request signature, dispatches to :mod:`.fedapi` and
records the request in the peer's request log.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from signedjson.types import VerifyKey
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.web.server import Request
from unpaddedbase64 import decode_base64

from . import badanswers
from .behaviour import Behaviour
from .fedapi import Ctx, corrupt_response, err, omit_members
from .server import FakeServer
from .signing import parse_x_matrix

if TYPE_CHECKING:
    from .peer import Peer

logger = logging.getLogger("fakepeer")


class IncomingHandler:
    """Entry point for requests to fake servers (one per peer)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._remote_keys: dict[tuple[str, str], VerifyKey] = {}

    def handle_request(self, server: FakeServer, request: Request) -> None:
        """Entry point for every request on every fake server listener."""
        d = defer.ensureDeferred(self._handle(server, request))
        d.addErrback(
            lambda f: logger.error("request handling failed: %s", f.getTraceback())
        )

    async def _handle(self, server: FakeServer, request: Request) -> None:
        started = time.monotonic()
        raw_path = (request.path or b"/").decode("ascii", "replace")
        path = unquote(raw_path)
        method = (request.method or b"GET").decode("ascii", "replace")
        auth = parse_x_matrix(request.getHeader(b"authorization"))  # type: ignore[arg-type]
        raw_body = request.content.read() if request.content is not None else b""
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": method,
            "path": path,
            "query": {
                k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
                for k, vs in (request.args or {}).items()
            },
            "origin": auth.origin if auth else None,
            "server": server.name,
            "status": None,
            "bytes": 0,
            "req_bytes": len(raw_body),
            "ms": None,
            "behaviour": None,
        }
        self.peer.requests.append(entry)
        gone = [False]
        request.notifyFinish().addErrback(lambda _: gone.__setitem__(0, True))

        # Rules see the path, raw and decoded, and the decoded path with its
        # query (e.g. to hold only requests at one event_id).
        uri = unquote((request.uri or b"/").decode("ascii", "replace"))
        rule = self.peer.behaviours.match(server.name, (path, raw_path, uri))
        if rule is not None:
            entry["behaviour"] = rule.action
            logger.info(
                "behaviour %s on %s %s %s", rule.action, server.name, method, path
            )
            if rule.action == "hang":
                return
            if rule.action == "drop":
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
                entry["ms"] = (time.monotonic() - started) * 1000
                return
            if rule.action == "delay":
                await deferLater(self.peer.reactor, rule.seconds, lambda: None)
            if rule.action == "hold":
                held = rule.held()
                if rule.seconds > 0:
                    held.addTimeout(
                        rule.seconds, self.peer.reactor, onTimeoutCancel=lambda *_: None
                    )
                await held
            if rule.action == "error":
                status, body = err(rule.status, "M_UNKNOWN", "injected error")
                self._respond(request, gone, entry, started, status, body)
                return

        uri = (request.uri or b"/").decode("ascii", "replace")
        args = {
            k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
            for k, vs in (request.args or {}).items()
        }
        ctx = Ctx(
            server, method, path, uri, args, raw_body, auth.origin if auth else None
        )
        try:
            if self.peer.verify_requests and not path.startswith("/_matrix/key/"):
                problem = await self._verify(ctx, auth)
                if problem is not None:
                    self._respond(request, gone, entry, started, *problem)
                    return
            status, body = await self.peer.fed.dispatch(ctx)
        except Exception:
            logger.exception("error handling %s %s", method, path)
            status, body = err(500, "M_UNKNOWN", "internal error in fake peer")
        if rule is not None and rule.action == "bad_signature":
            body = corrupt_response(body)
        if rule is not None and rule.action == "omit" and status == 200:
            body, entry["omitted"] = omit_members(body, rule.omit)
        if rule is not None and rule.action == "malformed" and status == 200:
            body = badanswers.malformed(body, rule.mode)
        self._respond(request, gone, entry, started, status, body, rule)

    def _respond(
        self,
        request: Request,
        gone: list[bool],
        entry: dict[str, Any],
        started: float,
        status: int,
        body: bytes,
        rule: Behaviour | None = None,
    ) -> None:
        """Log the request's outcome and send the answer: whole, or as
        ``rule`` says (trickled, or cut short)."""
        entry["status"] = status
        entry["bytes"] = len(body)
        entry["ms"] = (time.monotonic() - started) * 1000
        logger.info(
            "%s %s %s from %s -> %d, %d bytes, %.1f ms",
            entry["server"],
            entry["method"],
            entry["path"],
            entry["origin"],
            status,
            len(body),
            entry["ms"],
        )
        if gone[0]:
            entry["client_gone"] = True
            return
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if rule is not None and status == 200 and rule.action == "truncate":
            entry["truncated_at"] = badanswers.write_truncated(request, body)
            return
        if rule is not None and status == 200 and rule.action == "trickle":
            d = defer.ensureDeferred(
                badanswers.trickle(
                    self.peer.reactor, request, body, rule, lambda: gone[0]
                )
            )
            d.addCallback(lambda sent: entry.__setitem__("trickled", sent))
            d.addErrback(lambda f: logger.error("trickle failed: %s", f.value))
            return
        request.write(body)
        request.finish()

    async def _verify(self, ctx: Ctx, auth: Any) -> tuple[int, bytes] | None:
        """Check the X-Matrix signature of ``ctx`` (only with --verify-requests)."""
        if auth is None:
            return err(401, "M_MISSING_TOKEN", "Missing X-Matrix authorization")
        if auth.destination is not None and auth.destination != ctx.server.name:
            return err(401, "M_UNAUTHORIZED", "Wrong destination")
        key = await self._verify_key(auth.origin, auth.key_id)
        if key is None:
            return err(401, "M_UNAUTHORIZED", "Could not fetch origin key")
        content = ctx.json() if ctx.raw_body else None
        if not auth.verify(key, ctx.method, ctx.uri, ctx.server.name, content):
            return err(401, "M_UNAUTHORIZED", "Invalid X-Matrix signature")
        return None

    async def _verify_key(self, origin: str, key_id: str) -> VerifyKey | None:
        if self.peer.is_fake(origin):
            k = self.peer.key_for(origin)
            return k.verify_key if k.key_id == key_id else None
        cached = self._remote_keys.get((origin, key_id))
        if cached is not None:
            return cached
        try:
            resp = await self.peer.client.request(
                None, origin, "GET", "/_matrix/key/v2/server", timeout=30
            )
            body = resp.json()
            for kid, data in body.get("verify_keys", {}).items():
                vk = decode_verify_key_bytes(kid, decode_base64(data["key"]))
                verify_signed_json(body, origin, vk)
                self._remote_keys[(origin, kid)] = vk
        except (Exception, SignatureVerifyException) as e:  # noqa: BLE001
            logger.warning("key fetch from %s failed: %r", origin, e)
            return None
        return self._remote_keys.get((origin, key_id))
