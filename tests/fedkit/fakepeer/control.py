"""The plain-HTTP JSON control API (listening on 127.0.0.1 only).

All bodies are JSON; errors come back as ``{"error": msg}`` with a 4xx/5xx
status. Path parameters (room ids, server names) should be percent-encoded.

Servers
  ``GET  /control/status`` -> {pid, servers (count), rooms, remote_rooms, requests, transactions}
  ``GET  /control/servers`` -> {servers: [{name, port, running, key_id, connections}]}
  ``POST /control/servers`` {count} -> {servers: [names]} (new fake servers, no room)
  ``POST /control/servers/{name}/stop`` | ``.../start`` -> server json. Stop closes the
  listener and aborts open connections; start re-listens on the same port.

Rooms hosted by fake servers
  ``POST /control/rooms`` {room_version="10", members=10, servers=1, name="Fake room"|null,
  topic=null, alias=false, bans=0, kicks=0, invites=0, knocks=0, power_users=0, acl=false,
  history_visibility="shared", join_rule=null} -> {room_id, room_version, creator,
  resident, servers, member_count, state_event_count, event_count, build_seconds}.
  ``members`` are in addition to the creator (member_count = members + 1).
  ``GET /control/rooms`` -> {rooms: [summary]}; ``GET /control/rooms/{roomId}`` -> summary
  {room_id, room_version, creator, resident, servers, event_count, state_event_count,
  member_count, memberships, servers_in_room, real_servers_joined, forward_extremities,
  create_event_id, last_event_id}.
  ``GET /control/rooms/{roomId}/events?since=0&limit=100`` -> {events (with event_id), total}
  ``POST /control/rooms/{roomId}/send`` {type, content, state_key?, sender? (default
  creator; must be on a fake server), destinations? (default: real servers joined),
  auth_events? (event ids used as given instead of those chosen against current
  state), apply_state=true (false: logged and served, current state unchanged, as
  for an event the resident rejected), prev_events? (event ids used as given
  instead of the forward extremities: forks the DAG)}
  -> {event_id, delivered: {dest: status (0 = connection failure)}, responses}
  ``POST /control/rooms/{roomId}/join_users`` {count, servers?, destinations?}
  -> {event_ids, user_ids, build_seconds, delivered, responses}
  ``POST /control/rooms/{roomId}/hide_servers`` {servers} -> {hidden}: leave these
  servers out of the ``servers_in_room`` of later partial ``/send_join`` answers
  (a resident that omits servers); ``servers: []`` hides none again.

Acting as a joining server / making requests
  ``POST /control/join`` {room_id, remote, server?, user_localpart="joiner",
  omit_members=true|false|null|"raw", send_join_version=2, include_body=true,
  event_overrides={} (top-level fields set on the make_join template before signing),
  template=null (a make_join answer to sign instead of asking make_join),
  bad_signature=false (corrupt the join's signatures once signed)}
  -> {server, user_id, event_id, join_event, make_join: {status, body, seconds} | null
  (null: template given), send_join: {status, body?, bytes, seconds, answered_at, uri,
  summary} | null}
  ``POST /control/federation_request`` {server, destination, method, path (encoded,
  with query), content?, timeout?, include_body=true} -> {status, body (null when
  include_body is false: the answer is only counted), bytes, seconds}

Misbehaviour
  ``POST /control/behaviour`` {server="*", path_regex, action: delay|error|hang|drop|
  bad_signature|omit|hold|trickle|truncate|malformed, seconds, status=500, count=null,
  omit=0, mode=null, skip=0} -> {id}. ``skip``: matching requests let through
  untouched before the rule applies. ``hold``
  keeps matching requests waiting until the rule is removed (or cleared), then
  answers them normally; ``seconds`` > 0 caps the wait. The regex is
  searched in the decoded and in the raw request path (no query string). ``count``
  is the rule's budget of requests (null: unlimited). ``omit`` (action omit): leave
  that many member events out of the answer's ``pdus`` (the first ones the
  ``auth_chain`` does not carry too), e.g. a ``/state`` that lies by omission; the
  request log entry says how many (``omitted``). Broken answers (200s only, see
  ``badanswers``): ``trickle`` sends the answer one byte a second while the rule is
  in place (at most ``seconds`` if > 0), then the rest; ``truncate`` sends half of
  it under the full Content-Length and closes the connection; ``malformed`` with
  ``mode`` ``invalid_json`` (default: half the JSON, a complete HTTP answer) or
  ``wrong_shape`` (valid JSON, every top-level list holding numbers). The log entry
  says ``trickled`` / ``truncated_at`` (bytes).
  ``GET /control/behaviour`` -> {behaviours}; ``DELETE /control/behaviour`` -> {cleared};
  ``DELETE /control/behaviour/{id}``.

Logs
  ``GET /control/transactions?origin=&destination=`` -> {transactions: [{txn_id, origin,
  destination, time, body}]}; ``DELETE /control/transactions``.
  ``GET /control/requests?server=&origin=&path_regex=&since=`` -> {requests: [{time,
  method, path, origin, server, status, bytes, req_bytes, ms, behaviour, omitted?}]};
  ``DELETE /control/requests``.
  ``GET /control/invites`` -> {invites: [{origin, server, event}]}
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .behaviour import BehaviourError
from .errors import ControlError
from .peer import Peer

logger = logging.getLogger("fakepeer.control")

CtlHandler = Callable[["ControlAPI", Request, dict[str, str], Any], Awaitable[Any]]
_ROUTES: list[tuple[str, re.Pattern[str], CtlHandler]] = []


def route(method: str, pattern: str) -> Callable[[CtlHandler], CtlHandler]:
    """Register a control handler; ``{x}`` matches one path segment."""
    rx = re.compile(
        "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern)) + "/?$"
    )

    def deco(fn: CtlHandler) -> CtlHandler:
        _ROUTES.append((method, rx, fn))
        return fn

    return deco


def _arg(request: Request, name: str) -> str | None:
    vals = (request.args or {}).get(name.encode())
    return vals[0].decode() if vals else None


class ControlAPI(Resource):
    """Twisted resource serving the control API."""

    isLeaf = True

    def __init__(self, peer: Peer) -> None:
        super().__init__()
        self.peer = peer

    def render(self, request: Request) -> Any:
        defer.ensureDeferred(self._handle(request))
        return NOT_DONE_YET

    async def _handle(self, request: Request) -> None:
        path = (request.path or b"/").decode("ascii", "replace")
        method = (request.method or b"GET").decode()
        status, payload = 404, {"error": f"no control endpoint {method} {path}"}
        for m, rx, fn in _ROUTES:
            match = rx.match(path)
            if match is None or m != method:
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            try:
                raw = request.content.read() if request.content is not None else b""
                body = json.loads(raw) if raw.strip() else {}
                status, payload = 200, await fn(self, request, params, body)
            except ControlError as e:
                status, payload = e.status, {"error": e.message}
            except (BehaviourError, ValueError, KeyError, TypeError) as e:
                logger.warning("bad control request %s %s: %r", method, path, e)
                status, payload = 400, {"error": f"{type(e).__name__}: {e}"}
            except Exception as e:  # noqa: BLE001 - reported to the caller
                logger.exception("control %s %s failed", method, path)
                status, payload = 500, {"error": f"{type(e).__name__}: {e}"}
            break
        data = json.dumps(payload).encode()
        if request.finished or request._disconnected:  # type: ignore[attr-defined]
            return
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(data)).encode())
        request.write(data)
        request.finish()

    # ------------------------------------------------------------------

    @route("GET", "/control/status")
    async def status(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return {
            "pid": os.getpid(),
            "servers": len(self.peer.servers),
            "rooms": list(self.peer.rooms),
            "remote_rooms": self.peer.remote_rooms,
            "requests": len(self.peer.requests),
            "transactions": len(self.peer.transactions),
        }

    @route("GET", "/control/servers")
    async def servers(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return {"servers": [s.to_json() for s in self.peer.servers.values()]}

    @route("POST", "/control/servers")
    async def new_servers(self, request: Request, p: dict[str, str], body: Any) -> Any:
        count = int(body.get("count", 1))
        return {"servers": [self.peer.new_server().name for _ in range(count)]}

    @route("POST", "/control/servers/{name}/stop")
    async def stop_server(self, request: Request, p: dict[str, str], body: Any) -> Any:
        srv = self.peer.server(p["name"])
        await srv.stop()
        return srv.to_json()

    @route("POST", "/control/servers/{name}/start")
    async def start_server(self, request: Request, p: dict[str, str], body: Any) -> Any:
        srv = self.peer.server(p["name"])
        srv.start()
        return srv.to_json()

    @route("POST", "/control/notary")
    async def notary(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return self.peer.notary.dedicated_server()

    @route("GET", "/control/rooms")
    async def rooms(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return {"rooms": [self.peer.room_summary(r) for r in self.peer.rooms.values()]}

    @route("POST", "/control/rooms")
    async def create_room(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return await self.peer.create_room(body)

    @route("GET", "/control/rooms/{room_id}")
    async def room(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return self.peer.room_summary(self.peer.room(p["room_id"]))

    @route("GET", "/control/rooms/{room_id}/events")
    async def room_events(self, request: Request, p: dict[str, str], body: Any) -> Any:
        room = self.peer.room(p["room_id"])
        since = int(_arg(request, "since") or 0)
        limit = int(_arg(request, "limit") or 100)
        evs = room.events[since : since + limit]
        return {
            "events": [dict(e.pdu(), event_id=e.event_id) for e in evs],
            "total": len(room.events),
        }

    @route("POST", "/control/rooms/{room_id}/send")
    async def send(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return await self.peer.send_event(self.peer.room(p["room_id"]), body)

    @route("POST", "/control/rooms/{room_id}/join_users")
    async def join_users(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return await self.peer.join_users(self.peer.room(p["room_id"]), body)

    @route("POST", "/control/rooms/{room_id}/hide_servers")
    async def hide_servers(self, request: Request, p: dict[str, str], body: Any) -> Any:
        room = self.peer.room(p["room_id"])
        servers = body.get("servers") if isinstance(body, dict) else None
        if not isinstance(servers, list) or not all(
            isinstance(s, str) for s in servers
        ):
            raise ControlError(400, "'servers' must be a list of server names")
        room.hidden_servers = set(servers)
        return {"hidden": sorted(room.hidden_servers)}

    @route("POST", "/control/join")
    async def join(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return await self.peer.join_remote(body)

    @route("POST", "/control/federation_request")
    async def federation_request(
        self, request: Request, p: dict[str, str], body: Any
    ) -> Any:
        return await self.peer.federation_request(body)

    @route("GET", "/control/behaviour")
    async def behaviours(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return {"behaviours": self.peer.behaviours.list()}

    @route("POST", "/control/behaviour")
    async def add_behaviour(
        self, request: Request, p: dict[str, str], body: Any
    ) -> Any:
        return {"id": self.peer.behaviours.add(body).id}

    @route("DELETE", "/control/behaviour")
    async def clear_behaviours(
        self, request: Request, p: dict[str, str], body: Any
    ) -> Any:
        return {"cleared": self.peer.behaviours.clear()}

    @route("DELETE", "/control/behaviour/{id}")
    async def remove_behaviour(
        self, request: Request, p: dict[str, str], body: Any
    ) -> Any:
        if not self.peer.behaviours.remove(p["id"]):
            raise ControlError(404, f"no behaviour {p['id']}")
        return {}

    @route("GET", "/control/transactions")
    async def transactions(self, request: Request, p: dict[str, str], body: Any) -> Any:
        origin = _arg(request, "origin")
        destination = _arg(request, "destination")
        txns = [
            t
            for t in self.peer.transactions
            if (origin is None or t["origin"] == origin)
            and (destination is None or t["destination"] == destination)
        ]
        return {"transactions": txns}

    @route("DELETE", "/control/transactions")
    async def clear_transactions(
        self, request: Request, p: dict[str, str], body: Any
    ) -> Any:
        n = len(self.peer.transactions)
        self.peer.transactions.clear()
        return {"cleared": n}

    @route("GET", "/control/requests")
    async def requests(self, request: Request, p: dict[str, str], body: Any) -> Any:
        server = _arg(request, "server")
        origin = _arg(request, "origin")
        rx = _arg(request, "path_regex")
        since = float(_arg(request, "since") or 0)
        pattern = re.compile(rx) if rx else None
        out = [
            r
            for r in self.peer.requests
            if (server is None or r["server"] == server)
            and (origin is None or r["origin"] == origin)
            and (pattern is None or pattern.search(r["path"]))
            and r["time"] >= since
        ]
        return {"requests": out}

    @route("DELETE", "/control/requests")
    async def clear_requests(
        self, request: Request, p: dict[str, str], body: Any
    ) -> Any:
        n = len(self.peer.requests)
        self.peer.requests.clear()
        return {"cleared": n}

    @route("GET", "/control/invites")
    async def invites(self, request: Request, p: dict[str, str], body: Any) -> Any:
        return {"invites": self.peer.invites}
