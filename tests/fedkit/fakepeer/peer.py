"""Process-wide state of the fake peer: servers, rooms, logs and actions."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from twisted.internet import defer, threads
from twisted.python.failure import Failure

from ..certs import KitCA
from . import joiner
from .behaviour import BehaviourTable
from .errors import ControlError
from .fedapi import Ctx, FederationAPI
from .httpclient import FederationClient, q
from .incoming import IncomingHandler
from .keys import ServerKey
from .notary import Notary
from .rooms import MEMBER, Room, StoredEvent, server_of
from .server import FakeServer, TLSServerContextFactory
from .signing import event_id_of
from .synth import RoomSpec, build_room

logger = logging.getLogger("fakepeer")

#: Max PDUs per outgoing transaction (the spec's limit).
MAX_PDUS_PER_TXN = 50


class Peer:
    """Everything the fake peer process knows and does."""

    def __init__(
        self, reactor: Any, ca_dir: str, verify_requests: bool = False
    ) -> None:
        self.reactor = reactor
        self.ca = KitCA(ca_dir)
        self.tls_ctx = TLSServerContextFactory(self.ca.issue("fakepeer"))
        self.verify_requests = verify_requests
        self.servers: dict[str, FakeServer] = {}
        self.rooms: dict[str, Room] = {}
        #: Rooms on real servers that a fake server joined via /control/join.
        self.remote_rooms: dict[str, dict[str, Any]] = {}
        self.behaviours = BehaviourTable()
        self.transactions: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.invites: list[dict[str, Any]] = []
        self.client = FederationClient(reactor, self.ca.cert_path)
        self.fed = FederationAPI(self)
        self.incoming = IncomingHandler(self)
        self.notary = Notary(self)
        self._txn_ids = itertools.count(1)
        self._pending: set[defer.Deferred[Any]] = set()

    # ------------------------------------------------------------------
    # servers

    def new_server(self) -> FakeServer:
        """Create and start a fake server on a fresh port."""
        srv = FakeServer(self.reactor, self.tls_ctx, self.incoming.handle_request)
        srv.start()
        self.servers[srv.name] = srv
        return srv

    def server(self, name: str) -> FakeServer:
        """A fake server by name (ControlError 404 if unknown)."""
        srv = self.servers.get(name)
        if srv is None:
            raise ControlError(404, f"unknown fake server {name!r}")
        return srv

    def key_for(self, name: str) -> ServerKey:
        """The signing key of fake server ``name``."""
        key = self.server(name).key
        assert key is not None
        return key

    def is_fake(self, name: str) -> bool:
        """True when ``name`` is one of our fake servers."""
        return name in self.servers

    async def shutdown(self) -> None:
        """Stop all listeners and close client connections."""
        await defer.gatherResults([s.stop() for s in self.servers.values()])
        try:
            await self.client.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass

    # ------------------------------------------------------------------
    # rooms

    def room(self, room_id: str) -> Room:
        """A hosted room by id (ControlError 404 if unknown)."""
        room = self.rooms.get(room_id)
        if room is None:
            raise ControlError(404, f"unknown room {room_id!r}")
        return room

    def find_event(self, event_id: str) -> tuple[Room, StoredEvent] | None:
        """Look an event up in every hosted room."""
        for room in self.rooms.values():
            ev = room.by_id.get(event_id)
            if ev is not None:
                return room, ev
        return None

    async def create_room(self, body: dict[str, Any]) -> dict[str, Any]:
        """Build a synthetic room (``POST /control/rooms``)."""
        try:
            spec = RoomSpec.from_json(body)
        except ValueError as e:
            raise ControlError(400, str(e)) from e
        servers = [self.new_server() for _ in range(spec.servers)]
        keys: dict[str, ServerKey] = {s.name: self.key_for(s.name) for s in servers}
        room: Room = await threads.deferToThread(
            build_room, spec, list(keys.values()), keys.__getitem__
        )
        room._key_for = self.key_for  # from now on any fake server may sign
        self.rooms[room.room_id] = room
        logger.info(
            "built room %s v%s: %d events in %.2fs",
            room.room_id,
            spec.room_version,
            len(room.events),
            room.build_seconds,
        )
        return {
            "room_id": room.room_id,
            "room_version": room.room_version.identifier,
            "creator": room.creator,
            "resident": room.resident,
            "servers": list(room.fake_servers),
            "member_count": room.joined_count(),
            "state_event_count": len(room.current),
            "event_count": len(room.events),
            "build_seconds": room.build_seconds,
        }

    def room_summary(self, room: Room) -> dict[str, Any]:
        """``GET /control/rooms/{roomId}``."""
        servers_in_room = room.servers_in_room()
        return {
            "room_id": room.room_id,
            "room_version": room.room_version.identifier,
            "creator": room.creator,
            "resident": room.resident,
            "servers": list(room.fake_servers),
            "event_count": len(room.events),
            "state_event_count": len(room.current),
            "member_count": room.joined_count(),
            "memberships": room.membership_counts(),
            "servers_in_room": len(servers_in_room),
            "real_servers_joined": self.real_servers_joined(room),
            "forward_extremities": list(room.extremities),
            "create_event_id": room.create_event_id,
            "last_event_id": room.events[-1].event_id if room.events else None,
        }

    def real_servers_joined(self, room: Room) -> list[str]:
        """Non-fake servers with joined members in ``room``."""
        return sorted(s for s in room.servers_in_room() if not self.is_fake(s))

    async def send_event(self, room: Room, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /control/rooms/{roomId}/send``."""
        sender = body.get("sender") or room.creator
        if not self.is_fake(server_of(sender)):
            raise ControlError(400, f"sender {sender!r} is not on a fake server")
        if "type" not in body:
            raise ControlError(400, "missing 'type'")
        auth_events = _known_event_ids(room, body, "auth_events")
        prev_events = _known_event_ids(room, body, "prev_events")
        ev = room.create_event(
            sender,
            body["type"],
            body.get("content") or {},
            body.get("state_key"),
            auth_events=auth_events,
            apply_state=bool(body.get("apply_state", True)),
            prev_events=prev_events,
        )
        destinations = body.get("destinations")
        if destinations is None:
            destinations = self.real_servers_joined(room)
        delivered, responses = await self.push_events(
            [ev], destinations, origin=server_of(sender)
        )
        return {"event_id": ev.event_id, "delivered": delivered, "responses": responses}

    async def join_users(self, room: Room, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /control/rooms/{roomId}/join_users``: add members and push them."""
        count = int(body.get("count") or 1)
        servers = body.get("servers") or room.fake_servers
        started = time.monotonic()
        events: list[StoredEvent] = []
        base = len(room.members)
        for i in range(count):
            server = servers[(base + i) % len(servers)]
            user = f"@j{base + i}:{server}"
            events.append(room.create_event(user, MEMBER, {"membership": "join"}, user))
        build_seconds = time.monotonic() - started
        destinations = body.get("destinations")
        if destinations is None:
            destinations = self.real_servers_joined(room)
        delivered, responses = await self.push_events(events, destinations, origin=None)
        return {
            "event_ids": [e.event_id for e in events],
            "user_ids": [e.state_key for e in events],
            "build_seconds": build_seconds,
            "delivered": delivered,
            "responses": responses,
        }

    # ------------------------------------------------------------------
    # outgoing pushes

    async def push_events(
        self,
        events: list[StoredEvent],
        destinations: list[str],
        origin: str | None,
    ) -> tuple[dict[str, int], dict[str, Any]]:
        """Send ``events`` in transactions (≤50 PDUs) to each destination.

        ``origin=None`` sends each batch from the first event's sender server.
        Returns ``(status per destination, last response body per destination)``;
        status 0 means the request failed (the body then holds the error).
        """

        async def one(dest: str) -> tuple[str, int, Any]:
            status, body = 0, None
            for i in range(0, len(events), MAX_PDUS_PER_TXN):
                batch = events[i : i + MAX_PDUS_PER_TXN]
                src = origin or server_of(batch[0].sender)
                status, body = await self.send_transaction(
                    src, dest, [e.pdu() for e in batch]
                )
                if status != 200:
                    break
            return dest, status, body

        results = await defer.gatherResults(
            [defer.ensureDeferred(one(d)) for d in destinations], consumeErrors=True
        )
        return ({d: s for d, s, _ in results}, {d: b for d, _, b in results})

    async def send_transaction(
        self,
        origin: str,
        destination: str,
        pdus: list[dict[str, Any]],
        edus: list[Any] | None = None,
    ) -> tuple[int, Any]:
        """PUT one transaction; returns (status or 0 on failure, body or error)."""
        txn_id = f"fp{int(time.time() * 1000)}.{next(self._txn_ids)}"
        content = {
            "origin": origin,
            "origin_server_ts": int(time.time() * 1000),
            "pdus": pdus,
            "edus": edus or [],
        }
        try:
            resp = await self.client.request(
                self.key_for(origin),
                destination,
                "PUT",
                f"/_matrix/federation/v1/send/{q(txn_id)}",
                content,
                timeout=120,
            )
        except Exception as e:  # noqa: BLE001 - reported to the caller
            logger.warning("send %s -> %s failed: %r", origin, destination, e)
            return 0, repr(e)
        return resp.status, resp.json()

    def relay_events(
        self, room: Room, events: list[StoredEvent], exclude: set[str]
    ) -> None:
        """Forward events accepted from one real server to the other real ones."""
        dests = [d for d in self.real_servers_joined(room) if d not in exclude]
        if not dests:
            return
        d = defer.ensureDeferred(self.push_events(events, dests, origin=room.resident))
        self._pending.add(d)

        def done(result: Any) -> None:
            self._pending.discard(d)
            if isinstance(result, Failure):
                logger.warning("relay failed: %s", result.getErrorMessage())

        d.addBoth(done)

    # ------------------------------------------------------------------
    # incoming transactions

    def receive_transaction(self, ctx: Ctx, body: dict[str, Any]) -> dict[str, Any]:
        """Record a /send body and accept PDUs for hosted rooms."""
        txn_id = ctx.params.get("txn_id", "")
        self.transactions.append(
            {
                "txn_id": txn_id,
                "origin": ctx.origin or body.get("origin"),
                "destination": ctx.server.name,
                "time": time.time(),
                "body": body,
            }
        )
        results: dict[str, Any] = {}
        accepted: dict[str, list[StoredEvent]] = {}
        for pdu in body.get("pdus") or []:
            if not isinstance(pdu, dict):
                continue
            room_id = pdu.get("room_id")
            room = self.rooms.get(room_id) if isinstance(room_id, str) else None
            rv = room.room_version if room else self._remote_room_version(room_id)
            try:
                event_id = event_id_of(rv, pdu)
            except Exception as e:  # noqa: BLE001 - reported per PDU
                results[str(pdu.get("event_id", len(results)))] = {"error": str(e)}
                continue
            if room is None:
                results[event_id] = {}
                continue
            sender = str(pdu.get("sender", ""))
            if ":" not in sender or server_of(sender) not in (
                pdu.get("signatures") or {}
            ):
                results[event_id] = {"error": "Event not signed by sender's server"}
                continue
            if event_id not in room.by_id:
                ev = room.append(event_id, pdu)
                accepted.setdefault(room.room_id, []).append(ev)
            results[event_id] = {}
        for room_id, evs in accepted.items():
            exclude = {server_of(e.sender) for e in evs}
            if ctx.origin:
                exclude.add(ctx.origin)
            self.relay_events(self.rooms[room_id], evs, exclude)
        return results

    def _remote_room_version(self, room_id: Any) -> Any:
        info = self.remote_rooms.get(room_id) if isinstance(room_id, str) else None
        ver = info["room_version"] if info else "10"
        return KNOWN_ROOM_VERSIONS[ver]

    def record_invite(self, ctx: Ctx, pdu: dict[str, Any]) -> None:
        """Remember an invite a real server sent to a fake user."""
        self.invites.append(
            {"origin": ctx.origin, "server": ctx.server.name, "event": pdu}
        )

    # ------------------------------------------------------------------
    # acting as a joining server

    async def join_remote(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /control/join`` (see :mod:`.joiner`)."""
        return await joiner.join_remote(self, body)

    async def federation_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /control/federation_request`` (see :mod:`.joiner`)."""
        return await joiner.federation_request(self, body)


def _known_event_ids(room: Room, body: dict[str, Any], key: str) -> list[str] | None:
    """``body[key]``, if given: a list of IDs of events of ``room``."""
    ids = body.get(key)
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ControlError(400, f"{key} must be a list of event ids")
    unknown = [i for i in ids if i not in room.by_id]
    if unknown:
        raise ControlError(400, f"unknown {key} {unknown}")
    return ids
