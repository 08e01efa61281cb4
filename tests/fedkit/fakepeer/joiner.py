"""The fake peer acting as a joining server against a real homeserver."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

from .errors import ControlError
from .httpclient import q
from .rooms import MEMBER
from .signing import corrupt_signatures, finalize_event

if TYPE_CHECKING:
    from .peer import Peer


async def join_remote(peer: Peer, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /control/join``: make_join + send_join against a real server."""
    room_id = body.get("room_id")
    remote = body.get("remote")
    if not room_id or not remote:
        raise ControlError(400, "room_id and remote are required")
    srv = peer.server(body["server"]) if body.get("server") else peer.new_server()
    key = srv.key
    assert key is not None
    user_id = f"@{body.get('user_localpart') or 'joiner'}:{srv.name}"
    result: dict[str, Any] = {
        "server": srv.name,
        "user_id": user_id,
        "make_join": None,
        "send_join": None,
        "join_event": None,
        "event_id": None,
    }
    # Test hook: sign a make_join answer obtained earlier (e.g. before the room's
    # server ACL denied this server, which make_join would now refuse).
    mj_body = body.get("template")
    if mj_body is None:
        vers = "&".join(f"ver={q(v)}" for v in KNOWN_ROOM_VERSIONS)
        mj = await peer.client.request(
            key,
            remote,
            "GET",
            f"/_matrix/federation/v1/make_join/{q(room_id)}/{q(user_id)}?{vers}",
        )
        mj_body = mj.json()
        result["make_join"] = {
            "status": mj.status,
            "body": mj_body,
            "seconds": mj.seconds,
        }
        if mj.status != 200 or not isinstance(mj_body, dict):
            return result
    elif not isinstance(mj_body, dict) or not isinstance(mj_body.get("event"), dict):
        raise ControlError(400, "template must be a make_join answer")
    rv = KNOWN_ROOM_VERSIONS.get(str(mj_body.get("room_version", "1")))
    if rv is None:
        raise ControlError(502, f"unknown room version {mj_body.get('room_version')!r}")
    event = dict(mj_body["event"])
    for k in ("signatures", "hashes", "unsigned", "event_id"):
        event.pop(k, None)
    # Test hook: change the template before signing (e.g. another sender and
    # state_key, to send a join the resident would have refused at make_join).
    overrides = body.get("event_overrides") or {}
    if not isinstance(overrides, dict):
        raise ControlError(400, "event_overrides must be an object")
    event.update(overrides)
    if isinstance(event.get("state_key"), str):
        result["user_id"] = event["state_key"]
    event["origin_server_ts"] = int(time.time() * 1000)
    event_id = finalize_event(rv, event, srv.name, key.signing_key)
    if body.get("bad_signature"):
        # Test hook: a join whose signature does not verify.
        corrupt_signatures(event)
    result["join_event"] = event
    result["event_id"] = event_id
    version = int(body.get("send_join_version", 2))
    uri = f"/_matrix/federation/v{version}/send_join/{q(room_id)}/{q(event_id)}"
    omit = body.get("omit_members", True)
    if omit is not None:
        if omit is True or omit is False:
            uri += "?omit_members=" + ("true" if omit else "false")
        else:
            uri += "?omit_members=" + str(omit)
    sj = await peer.client.request(key, remote, "PUT", uri, event, timeout=600)
    answered_at = time.time()
    sj_body = sj.json()
    result["send_join"] = {
        "status": sj.status,
        # when the whole answer had arrived (compare: transactions' "time")
        "answered_at": answered_at,
        "bytes": len(sj.body),
        "seconds": sj.seconds,
        "uri": uri,
        "summary": summarise_send_join(sj_body),
    }
    if body.get("include_body", True):
        result["send_join"]["body"] = sj_body
    if sj.status == 200:
        peer.remote_rooms[room_id] = {
            "room_version": rv.identifier,
            "remote": remote,
            "server": srv.name,
            "user_id": user_id,
            "event_id": event_id,
        }
    return result


async def federation_request(peer: Peer, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /control/federation_request``: a signed request from a fake server."""
    srv = peer.server(body.get("server") or "")
    resp = await peer.client.request(
        srv.key,
        body["destination"],
        body.get("method", "GET"),
        body["path"],
        body.get("content"),
        timeout=float(body.get("timeout", 300)),
    )
    return {
        "status": resp.status,
        # include_body false: the answer is counted, not parsed nor sent back
        # (e.g. 20 joiners' /state of a 100,000-member room at once).
        "body": resp.json() if body.get("include_body", True) else None,
        "bytes": len(resp.body),
        "seconds": resp.seconds,
    }


def summarise_send_join(body: Any) -> dict[str, Any] | None:
    """Counts describing a send_join response (v1 ``[200, {...}]`` or v2)."""
    if isinstance(body, list) and len(body) == 2:
        body = body[1]
    if not isinstance(body, dict):
        return None
    state = body.get("state") or []
    auth_chain = body.get("auth_chain") or []
    return {
        "members_omitted": body.get("members_omitted"),
        "state": len(state),
        "state_members": sum(
            1 for e in state if isinstance(e, dict) and e.get("type") == MEMBER
        ),
        "auth_chain": len(auth_chain),
        "servers_in_room": len(body.get("servers_in_room") or []),
        "has_event": "event" in body,
    }
