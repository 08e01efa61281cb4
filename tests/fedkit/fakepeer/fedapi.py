"""Federation endpoints served by every fake server listener.

Handlers take a :class:`Ctx` and return ``(status, body_bytes)``. Responses with
many events are assembled from the stored JSON bytes of each event instead of
re-serialising parsed dicts, so a 100,000-member ``/state`` costs a join of
byte strings.

Room endpoints answer for any room the peer hosts, on any fake server (so when
the resident is stopped, other fake servers in ``servers_in_room`` can still
serve a resync).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

from .notary import QueryError, parse_batch_query
from .rooms import MEMBER, Room, StoredEvent, dumps, server_of
from .signing import add_signature, corrupt_signatures, event_id_of

if TYPE_CHECKING:
    from .peer import Peer
    from .server import FakeServer

Result = tuple[int, bytes]


@dataclass
class Ctx:
    """One incoming federation request."""

    server: FakeServer
    method: str
    path: str
    uri: str
    args: dict[str, list[str]]
    raw_body: bytes
    origin: str | None
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The request body as JSON (None when empty)."""
        if not self.raw_body:
            return None
        return json.loads(self.raw_body)

    def arg(self, name: str) -> str | None:
        """The first value of a query parameter."""
        vals = self.args.get(name)
        return vals[0] if vals else None


def ok(obj: Any) -> Result:
    """200 with a JSON body."""
    return 200, dumps(obj)


def err(status: int, errcode: str, error: str, **extra: Any) -> Result:
    """A Matrix error response."""
    return status, dumps({"errcode": errcode, "error": error, **extra})


Handler = Callable[["FederationAPI", Ctx], Awaitable[Result]]
_ROUTES: list[tuple[str, re.Pattern[str], Handler]] = []


def route(method: str, pattern: str) -> Callable[[Handler], Handler]:
    """Register a handler for ``method`` and a path pattern with ``{param}``s."""
    rx = re.compile(
        "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern)) + "/?$"
    )

    def deco(fn: Handler) -> Handler:
        _ROUTES.append((method, rx, fn))
        return fn

    return deco


def corrupt_response(body: bytes) -> bytes:
    """Corrupt signatures of every event in a response body."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body

    def fix(o: Any) -> None:
        if isinstance(o, list):
            for x in o:
                fix(x)
            return
        if not isinstance(o, dict):
            return
        for k in ("state", "auth_chain", "pdus", "events"):
            if isinstance(o.get(k), list):
                for ev in o[k]:
                    if isinstance(ev, dict):
                        corrupt_signatures(ev)
        if isinstance(o.get("event"), dict):
            corrupt_signatures(o["event"])

    fix(obj)
    return dumps(obj)


def omit_members(body: bytes, n: int) -> tuple[bytes, int]:
    """Leave the first ``n`` member events out of a response's ``pdus`` (a
    ``/state`` answer that lies by omission). Member events the answer's
    ``auth_chain`` also carries are kept, so exactly the omitted ones are missing
    from the whole answer. Returns the new body and how many were left out."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body, 0
    pdus = obj.get("pdus") if isinstance(obj, dict) else None
    if not isinstance(pdus, list):
        return body, 0
    chain = obj.get("auth_chain")
    in_chain = {dumps(e) for e in chain} if isinstance(chain, list) else set()
    kept: list[Any] = []
    omitted = 0
    for pdu in pdus:
        if (
            omitted < n
            and isinstance(pdu, dict)
            and pdu.get("type") == MEMBER
            and dumps(pdu) not in in_chain
        ):
            omitted += 1
            continue
        kept.append(pdu)
    obj["pdus"] = kept
    return dumps(obj), omitted


class FederationAPI:
    """Dispatch and handlers for the federation endpoints."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def dispatch(self, ctx: Ctx) -> Result:
        """Route ``ctx`` to its handler (404 M_UNRECOGNIZED when none)."""
        path_matched = False
        for method, rx, fn in _ROUTES:
            m = rx.match(ctx.path)
            if m is None:
                continue
            path_matched = True
            if method != ctx.method:
                continue
            ctx.params = m.groupdict()
            return await fn(self, ctx)
        if path_matched:
            return err(405, "M_UNRECOGNIZED", "Unrecognized request method")
        return err(404, "M_UNRECOGNIZED", "Unrecognized request")

    # ------------------------------------------------------------------
    # helpers

    def _room(self, ctx: Ctx) -> Room | None:
        return self.peer.rooms.get(ctx.params.get("room_id", ""))

    def _now(self) -> int:
        return int(time.time() * 1000)

    # ------------------------------------------------------------------
    # keys and version

    @route("GET", "/_matrix/key/v2/server")
    async def key_server(self, ctx: Ctx) -> Result:
        assert ctx.server.key is not None
        return 200, ctx.server.key.key_response_bytes()

    @route("GET", "/_matrix/key/v2/server/{key_id}")
    async def key_server_id(self, ctx: Ctx) -> Result:
        return await self.key_server(ctx)

    @route("POST", "/_matrix/key/v2/query")
    async def key_query(self, ctx: Ctx) -> Result:
        """The notary's batch answer (see :mod:`.notary`)."""
        try:
            wanted = parse_batch_query(ctx.json(), self._now())
        except (QueryError, ValueError) as e:
            return err(400, "M_BAD_JSON", str(e))
        assert ctx.server.key is not None
        return 200, await self.peer.notary.answer(ctx.server.key, wanted)

    @route("GET", "/_matrix/key/v2/query/{server_name}")
    async def key_query_one(self, ctx: Ctx) -> Result:
        """The notary's answer for one server (``minimum_valid_until_ts`` in the
        query string, else now)."""
        minimum = ctx.arg("minimum_valid_until_ts")
        try:
            at_least = int(minimum) if minimum is not None else self._now()
        except ValueError:
            return err(400, "M_INVALID_PARAM", "minimum_valid_until_ts: not an integer")
        assert ctx.server.key is not None
        wanted = {ctx.params["server_name"]: (at_least, True)}
        return 200, await self.peer.notary.answer(ctx.server.key, wanted)

    @route("GET", "/_matrix/key/v2/query/{server_name}/{key_id}")
    async def key_query_one_id(self, ctx: Ctx) -> Result:
        return await self.key_query_one(ctx)

    @route("GET", "/_matrix/federation/v1/version")
    async def version(self, ctx: Ctx) -> Result:
        return ok({"server": {"name": "fedkit-fakepeer", "version": "0.1"}})

    # ------------------------------------------------------------------
    # joins and leaves

    def _join_rule(self, room: Room) -> str:
        eid = room.current.get(("m.room.join_rules", ""))
        if eid is None:
            return "invite"
        return str(room.by_id[eid].pdu()["content"].get("join_rule", "invite"))

    async def _make_membership(self, ctx: Ctx, membership: str) -> Result:
        room = self._room(ctx)
        if room is None:
            return err(404, "M_NOT_FOUND", "Unknown room")
        user_id = ctx.params["user_id"]
        if ctx.origin is not None and server_of(user_id) != ctx.origin:
            return err(403, "M_FORBIDDEN", "User not from origin server")
        if membership == "join":
            versions = ctx.args.get("ver") or ["1"]
            if room.room_version.identifier not in versions:
                return err(
                    400,
                    "M_INCOMPATIBLE_ROOM_VERSION",
                    "Your homeserver does not support the features required to join this room",
                    room_version=room.room_version.identifier,
                )
            current = room.members.get(user_id)
            if current == "ban":
                return err(403, "M_FORBIDDEN", "User is banned")
            if current not in ("join", "invite") and self._join_rule(room) != "public":
                return err(403, "M_FORBIDDEN", "You are not invited to this room")
        template = room.new_event_dict(
            user_id, MEMBER, {"membership": membership}, user_id
        )
        template["origin"] = ctx.server.name
        return ok({"event": template, "room_version": room.room_version.identifier})

    @route("GET", "/_matrix/federation/v1/make_join/{room_id}/{user_id}")
    async def make_join(self, ctx: Ctx) -> Result:
        return await self._make_membership(ctx, "join")

    @route("GET", "/_matrix/federation/v1/make_leave/{room_id}/{user_id}")
    async def make_leave(self, ctx: Ctx) -> Result:
        return await self._make_membership(ctx, "leave")

    def _check_membership_pdu(
        self, ctx: Ctx, room: Room, membership: str
    ) -> tuple[Result | None, dict[str, Any], str]:
        pdu = ctx.json()
        if not isinstance(pdu, dict):
            return err(400, "M_BAD_JSON", "Body must be an event"), {}, ""
        pdu.pop("event_id", None)
        if (
            pdu.get("type") != MEMBER
            or (pdu.get("content") or {}).get("membership") != membership
            or pdu.get("state_key") != pdu.get("sender")
        ):
            return err(400, "M_BAD_JSON", f"Not a {membership} event"), {}, ""
        if pdu.get("room_id") != room.room_id:
            return err(400, "M_BAD_JSON", "Event room_id mismatch"), {}, ""
        sender_server = server_of(str(pdu.get("sender")))
        if sender_server not in (pdu.get("signatures") or {}):
            return (
                err(403, "M_FORBIDDEN", "Event not signed by sender's server"),
                {},
                "",
            )
        if ctx.origin is not None and sender_server != ctx.origin:
            return err(403, "M_FORBIDDEN", "Sender not from origin server"), {}, ""
        try:
            event_id = event_id_of(room.room_version, pdu)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            return err(400, "M_BAD_JSON", f"Bad event: {e}"), {}, ""
        if event_id != ctx.params.get("event_id"):
            return err(400, "M_BAD_JSON", "Event id does not match the path"), {}, ""
        return None, pdu, event_id

    async def _send_join(self, ctx: Ctx, v1: bool) -> Result:
        room = self._room(ctx)
        if room is None:
            return err(404, "M_NOT_FOUND", "Unknown room")
        partial = False
        if not v1 and "omit_members" in ctx.args:
            value = ctx.arg("omit_members")
            if value not in ("true", "false"):
                return err(
                    400,
                    "M_INVALID_PARAM",
                    "Boolean query parameter 'omit_members' must be one of ['true', 'false']",
                )
            partial = value == "true"
        problem, pdu, event_id = self._check_membership_pdu(ctx, room, "join")
        if problem is not None:
            return problem
        known = room.by_id.get(event_id)
        if known is not None:
            state = room.state_before(event_id)
            auth_of_join = list(known.auth_ids)
        else:
            state = dict(room.current)
            auth_of_join = list(pdu.get("auth_events") or ())
            if room.room_version.msc4291_room_ids_as_hashes:
                auth_of_join.append(room.create_event_id)
        servers_in_room = sorted(  # before the join
            s for s in room.servers_in_room() if s not in room.hidden_servers
        )
        user_id = str(pdu["state_key"])
        if partial:
            state_ids = {eid for (t, _), eid in state.items() if t != MEMBER}
            own = state.get((MEMBER, user_id))
            if own is not None:
                state_ids.add(own)
            if (("m.room.name", "") not in state) and (
                ("m.room.canonical_alias", "") not in state
            ):
                for hero in room.heroes(user_id):
                    hid = state.get((MEMBER, hero))
                    if hid is not None:
                        state_ids.add(hid)
            auth_ids = room.auth_chain(state_ids) | room.auth_chain(
                auth_of_join, include_given=True
            )
            auth_ids -= state_ids
        else:
            state_ids = set(state.values())
            auth_ids = room.auth_chain(state_ids) | room.auth_chain(
                auth_of_join, include_given=True
            )
        if known is None:
            ev = room.append(event_id, pdu)
            self.peer.relay_events(room, [ev], exclude={server_of(user_id)})
        parts = [
            b'{"origin":',
            dumps(ctx.server.name),
            b',"event":',
            dumps(pdu),
            b',"members_omitted":',
            b"true" if partial else b"false",
            b',"state":',
            room.json_array(room.sorted_ids(state_ids)),
            b',"auth_chain":',
            room.json_array(room.sorted_ids(auth_ids)),
        ]
        if partial:
            parts += [b',"servers_in_room":', dumps(servers_in_room)]
        parts.append(b"}")
        body = b"".join(parts)
        if v1:
            body = b"[200," + body + b"]"
        return 200, body

    @route("PUT", "/_matrix/federation/v1/send_join/{room_id}/{event_id}")
    async def send_join_v1(self, ctx: Ctx) -> Result:
        return await self._send_join(ctx, v1=True)

    @route("PUT", "/_matrix/federation/v2/send_join/{room_id}/{event_id}")
    async def send_join_v2(self, ctx: Ctx) -> Result:
        return await self._send_join(ctx, v1=False)

    async def _send_leave(self, ctx: Ctx, v1: bool) -> Result:
        room = self._room(ctx)
        if room is None:
            return err(404, "M_NOT_FOUND", "Unknown room")
        problem, pdu, event_id = self._check_membership_pdu(ctx, room, "leave")
        if problem is not None:
            return problem
        if event_id not in room.by_id:
            ev = room.append(event_id, pdu)
            self.peer.relay_events(room, [ev], exclude={server_of(str(pdu["sender"]))})
        return (200, b"[200,{}]") if v1 else ok({})

    @route("PUT", "/_matrix/federation/v1/send_leave/{room_id}/{event_id}")
    async def send_leave_v1(self, ctx: Ctx) -> Result:
        return await self._send_leave(ctx, v1=True)

    @route("PUT", "/_matrix/federation/v2/send_leave/{room_id}/{event_id}")
    async def send_leave_v2(self, ctx: Ctx) -> Result:
        return await self._send_leave(ctx, v1=False)

    async def _invite(self, ctx: Ctx, v1: bool) -> Result:
        body = ctx.json() or {}
        pdu = body.get("event", body) if not v1 else body
        rv = KNOWN_ROOM_VERSIONS.get(
            str(body.get("room_version", "10")) if not v1 else "10"
        )
        srv = ctx.server
        if rv is None or not isinstance(pdu, dict) or srv.key is None:
            return err(400, "M_BAD_JSON", "Bad invite")
        pdu.pop("event_id", None)
        add_signature(rv, pdu, srv.name, srv.key.signing_key)
        self.peer.record_invite(ctx, pdu)
        return (
            (200, b"[200," + dumps({"event": pdu}) + b"]") if v1 else ok({"event": pdu})
        )

    @route("PUT", "/_matrix/federation/v1/invite/{room_id}/{event_id}")
    async def invite_v1(self, ctx: Ctx) -> Result:
        return await self._invite(ctx, v1=True)

    @route("PUT", "/_matrix/federation/v2/invite/{room_id}/{event_id}")
    async def invite_v2(self, ctx: Ctx) -> Result:
        return await self._invite(ctx, v1=False)

    # ------------------------------------------------------------------
    # state and events

    def _state_at(self, ctx: Ctx) -> tuple[Result | None, Room | None, set[str]]:
        room = self._room(ctx)
        if room is None:
            return err(404, "M_NOT_FOUND", "Unknown room"), None, set()
        event_id = ctx.arg("event_id")
        if not event_id:
            return err(400, "M_MISSING_PARAM", "Missing event_id"), None, set()
        if event_id not in room.by_id:
            return err(404, "M_NOT_FOUND", "Unknown event"), None, set()
        return None, room, set(room.state_before(event_id).values())

    @route("GET", "/_matrix/federation/v1/state/{room_id}")
    async def state(self, ctx: Ctx) -> Result:
        problem, room, state_ids = self._state_at(ctx)
        if problem is not None or room is None:
            return problem or err(500, "M_UNKNOWN", "?")
        auth_ids = room.auth_chain(state_ids)
        return 200, b"".join(
            [
                b'{"pdus":',
                room.json_array(room.sorted_ids(state_ids)),
                b',"auth_chain":',
                room.json_array(room.sorted_ids(auth_ids)),
                b"}",
            ]
        )

    @route("GET", "/_matrix/federation/v1/state_ids/{room_id}")
    async def state_ids(self, ctx: Ctx) -> Result:
        problem, room, state_ids = self._state_at(ctx)
        if problem is not None or room is None:
            return problem or err(500, "M_UNKNOWN", "?")
        auth_ids = room.auth_chain(state_ids)
        return ok(
            {
                "pdu_ids": room.sorted_ids(state_ids),
                "auth_chain_ids": room.sorted_ids(auth_ids),
            }
        )

    @route("GET", "/_matrix/federation/v1/event/{event_id}")
    async def event(self, ctx: Ctx) -> Result:
        found = self.peer.find_event(ctx.params["event_id"])
        if found is None:
            return err(404, "M_NOT_FOUND", "Unknown event")
        _, ev = found
        return 200, b"".join(
            [
                b'{"origin":',
                dumps(ctx.server.name),
                b',"origin_server_ts":',
                str(self._now()).encode(),
                b',"pdus":[',
                ev.json,
                b"]}",
            ]
        )

    @route("GET", "/_matrix/federation/v1/event_auth/{room_id}/{event_id}")
    async def event_auth(self, ctx: Ctx) -> Result:
        room = self._room(ctx)
        if room is None or ctx.params["event_id"] not in room.by_id:
            return err(404, "M_NOT_FOUND", "Unknown room or event")
        chain = room.auth_chain([ctx.params["event_id"]])
        return 200, b'{"auth_chain":' + room.json_array(room.sorted_ids(chain)) + b"}"

    @route("POST", "/_matrix/federation/v1/get_missing_events/{room_id}")
    async def get_missing_events(self, ctx: Ctx) -> Result:
        room = self._room(ctx)
        if room is None:
            return err(404, "M_NOT_FOUND", "Unknown room")
        body = ctx.json() or {}
        earliest = set(body.get("earliest_events") or [])
        latest = list(body.get("latest_events") or [])
        limit = int(body.get("limit") or 10)
        min_depth = int(body.get("min_depth") or 0)
        seen = set(latest) | earliest
        frontier = [
            p for e in latest if e in room.by_id for p in room.by_id[e].prev_ids
        ]
        found: list[StoredEvent] = []
        while frontier and len(found) < limit:
            nxt: list[str] = []
            for eid in frontier:
                if eid in seen or eid not in room.by_id:
                    continue
                seen.add(eid)
                ev = room.by_id[eid]
                if ev.depth < min_depth:
                    continue
                found.append(ev)
                if len(found) >= limit:
                    break
                nxt.extend(ev.prev_ids)
            frontier = nxt
        found.sort(key=lambda e: (e.depth, e.index))
        return 200, b'{"events":' + room.json_array(e.event_id for e in found) + b"}"

    @route("GET", "/_matrix/federation/v1/backfill/{room_id}")
    async def backfill(self, ctx: Ctx) -> Result:
        room = self._room(ctx)
        if room is None:
            return err(404, "M_NOT_FOUND", "Unknown room")
        limit = min(int(ctx.arg("limit") or 10), 100)
        frontier = [e for e in ctx.args.get("v", []) if e in room.by_id]
        seen: set[str] = set()
        found: list[StoredEvent] = []
        while frontier and len(found) < limit:
            nxt: list[str] = []
            for eid in frontier:
                if eid in seen or eid not in room.by_id:
                    continue
                seen.add(eid)
                ev = room.by_id[eid]
                found.append(ev)
                if len(found) >= limit:
                    break
                nxt.extend(ev.prev_ids)
            frontier = nxt
        found.sort(key=lambda e: (-e.depth, -e.index))
        return 200, b"".join(
            [
                b'{"origin":',
                dumps(ctx.server.name),
                b',"origin_server_ts":',
                str(self._now()).encode(),
                b',"pdus":',
                room.json_array(e.event_id for e in found),
                b"}",
            ]
        )

    # ------------------------------------------------------------------
    # transactions

    @route("PUT", "/_matrix/federation/v1/send/{txn_id}")
    async def send(self, ctx: Ctx) -> Result:
        body = ctx.json()
        if not isinstance(body, dict):
            return err(400, "M_BAD_JSON", "Transaction must be an object")
        results = self.peer.receive_transaction(ctx, body)
        return ok({"pdus": results})

    # ------------------------------------------------------------------
    # users, devices, queries

    @route("GET", "/_matrix/federation/v1/user/devices/{user_id}")
    async def user_devices(self, ctx: Ctx) -> Result:
        return ok({"user_id": ctx.params["user_id"], "stream_id": 0, "devices": []})

    @route("POST", "/_matrix/federation/v1/user/keys/query")
    async def user_keys_query(self, ctx: Ctx) -> Result:
        body = ctx.json() or {}
        users = list((body.get("device_keys") or {}).keys())
        return ok(
            {
                "device_keys": {u: {} for u in users},
                "master_keys": {},
                "self_signing_keys": {},
            }
        )

    @route("POST", "/_matrix/federation/v1/user/keys/claim")
    async def user_keys_claim(self, ctx: Ctx) -> Result:
        return ok({"one_time_keys": {}})

    @route("GET", "/_matrix/federation/v1/query/profile")
    async def query_profile(self, ctx: Ctx) -> Result:
        return err(404, "M_NOT_FOUND", "Profile not found")

    @route("GET", "/_matrix/federation/v1/query/directory")
    async def query_directory(self, ctx: Ctx) -> Result:
        alias = ctx.arg("room_alias")
        for room in self.peer.rooms.values():
            eid = room.current.get(("m.room.canonical_alias", ""))
            if (
                eid is not None
                and room.by_id[eid].pdu()["content"].get("alias") == alias
            ):
                return ok({"room_id": room.room_id, "servers": [room.resident]})
        return err(404, "M_NOT_FOUND", "Room alias not found")
