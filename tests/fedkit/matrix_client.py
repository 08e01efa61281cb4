"""A small synchronous Matrix client-server API client for black-box tests.

Methods named after an action raise :class:`MatrixError` on a non-2xx answer;
the generic :meth:`Client.get` / :meth:`Client.post` / :meth:`Client.put`
return ``(status, json)`` and never raise on an HTTP error, for tests that
assert on errors.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import requests

JsonDict = dict[str, Any]

CLIENT_V3 = "/_matrix/client/v3"


def _q(part: str) -> str:
    return quote(part, safe="")


class MatrixError(Exception):
    """A non-2xx answer from the homeserver."""

    def __init__(self, status: int, errcode: str | None, body: Any) -> None:
        self.status = status
        self.errcode = errcode
        self.body = body
        super().__init__(f"{status} {errcode}: {body}")

    @classmethod
    def from_response(cls, response: requests.Response) -> MatrixError:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        errcode = body.get("errcode") if isinstance(body, dict) else None
        return cls(response.status_code, errcode, body)


class Client:
    """One logged-in user talking to one homeserver's client API."""

    _txn_ids = itertools.count()

    def __init__(self, base_url: str, user_id: str, access_token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.user_id = user_id
        self.access_token = access_token
        self.session = requests.Session()
        self.session.trust_env = False  # never send loopback traffic to a proxy
        self.session.headers["Authorization"] = f"Bearer {access_token}"

    def __repr__(self) -> str:
        return f"<Client {self.user_id} @ {self.base_url}>"

    def close(self) -> None:
        self.session.close()

    # -- raw requests -------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 60,
    ) -> tuple[int, Any]:
        """Send a request to ``path`` (e.g. ``/_matrix/client/v3/...``) or a full URL.

        Returns ``(status, parsed JSON or text)`` without raising on HTTP errors.
        """
        url = path if path.startswith("http") else self.base_url + path
        r = self.session.request(method, url, json=json, params=params, timeout=timeout)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        return r.status_code, body

    def get(
        self,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 60,
    ) -> tuple[int, Any]:
        return self.request("GET", path, json=json, params=params, timeout=timeout)

    def post(
        self,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 60,
    ) -> tuple[int, Any]:
        return self.request(
            "POST",
            path,
            json=json if json is not None else {},
            params=params,
            timeout=timeout,
        )

    def put(
        self,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 60,
    ) -> tuple[int, Any]:
        return self.request(
            "PUT",
            path,
            json=json if json is not None else {},
            params=params,
            timeout=timeout,
        )

    def _call(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 60,
    ) -> Any:
        url = self.base_url + path
        r = self.session.request(method, url, json=json, params=params, timeout=timeout)
        if not 200 <= r.status_code < 300:
            raise MatrixError.from_response(r)
        return r.json()

    # -- rooms --------------------------------------------------------------

    def create_room(self, **body: Any) -> str:
        """``POST /createRoom`` with ``body`` (e.g. ``preset="public_chat"``); returns the room ID."""
        return self._call("POST", f"{CLIENT_V3}/createRoom", json=body)["room_id"]

    def join(
        self, room_id_or_alias: str, via: Iterable[str] = (), timeout: float = 120
    ) -> str:
        """``POST /join/{room}?server_name=...``; returns the room ID."""
        params = {"server_name": list(via)} if via else None
        return self._call(
            "POST",
            f"{CLIENT_V3}/join/{_q(room_id_or_alias)}",
            json={},
            params=params,
            timeout=timeout,
        )["room_id"]

    def leave(self, room_id: str, reason: str | None = None) -> None:
        body = {"reason": reason} if reason else {}
        self._call("POST", f"{CLIENT_V3}/rooms/{_q(room_id)}/leave", json=body)

    def invite(self, room_id: str, user_id: str) -> None:
        self._call(
            "POST", f"{CLIENT_V3}/rooms/{_q(room_id)}/invite", json={"user_id": user_id}
        )

    def kick(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        body: JsonDict = {"user_id": user_id}
        if reason:
            body["reason"] = reason
        self._call("POST", f"{CLIENT_V3}/rooms/{_q(room_id)}/kick", json=body)

    def ban(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        body: JsonDict = {"user_id": user_id}
        if reason:
            body["reason"] = reason
        self._call("POST", f"{CLIENT_V3}/rooms/{_q(room_id)}/ban", json=body)

    def send_event(self, room_id: str, event_type: str, content: JsonDict) -> str:
        """Send a message-like event; returns its event ID."""
        txn = f"fedkit-{time.time_ns()}-{next(self._txn_ids)}"
        return self._call(
            "PUT",
            f"{CLIENT_V3}/rooms/{_q(room_id)}/send/{_q(event_type)}/{txn}",
            json=content,
        )["event_id"]

    def send_message(self, room_id: str, body: str) -> str:
        """Send an ``m.text`` message; returns its event ID."""
        return self.send_event(
            room_id, "m.room.message", {"msgtype": "m.text", "body": body}
        )

    def send_state(
        self, room_id: str, event_type: str, state_key: str, content: JsonDict
    ) -> str:
        """Set a state event; returns its event ID."""
        return self._call(
            "PUT",
            f"{CLIENT_V3}/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}",
            json=content,
        )["event_id"]

    def room_state(self, room_id: str, timeout: float = 60) -> list[JsonDict]:
        return self._call(
            "GET", f"{CLIENT_V3}/rooms/{_q(room_id)}/state", timeout=timeout
        )

    def state_event(
        self, room_id: str, event_type: str, state_key: str = ""
    ) -> JsonDict:
        """Content of one state event."""
        return self._call(
            "GET",
            f"{CLIENT_V3}/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}",
        )

    def joined_members(self, room_id: str, timeout: float = 120) -> dict[str, JsonDict]:
        """``GET /joined_members``: user ID -> profile.

        Synapse blocks this until a partial-state room has its full state, which
        makes it a handy barrier (``timeout`` is the HTTP timeout)."""
        return self._call(
            "GET", f"{CLIENT_V3}/rooms/{_q(room_id)}/joined_members", timeout=timeout
        )["joined"]

    def members(
        self, room_id: str, timeout: float = 120, **params: Any
    ) -> list[JsonDict]:
        """``GET /members``: the member events (``params`` e.g. ``membership="join"``)."""
        return self._call(
            "GET",
            f"{CLIENT_V3}/rooms/{_q(room_id)}/members",
            params=params or None,
            timeout=timeout,
        )["chunk"]

    def messages(
        self,
        room_id: str,
        dir: str = "b",
        limit: int = 10,
        from_token: str | None = None,
        filter: JsonDict | None = None,
        timeout: float = 120,
    ) -> JsonDict:
        """``GET /messages``; the raw response (``chunk``, ``start``, ``end``)."""
        params: dict[str, Any] = {"dir": dir, "limit": limit}
        if from_token:
            params["from"] = from_token
        if filter is not None:
            params["filter"] = json.dumps(filter)
        return self._call(
            "GET",
            f"{CLIENT_V3}/rooms/{_q(room_id)}/messages",
            params=params,
            timeout=timeout,
        )

    def joined_rooms(self) -> list[str]:
        return self._call("GET", f"{CLIENT_V3}/joined_rooms")["joined_rooms"]

    # -- sync ---------------------------------------------------------------

    def sync(
        self,
        since: str | None = None,
        filter: JsonDict | str | None = None,
        timeout_ms: int = 0,
        full_state: bool = False,
    ) -> JsonDict:
        """One ``GET /sync``."""
        params: dict[str, Any] = {"timeout": timeout_ms}
        if since:
            params["since"] = since
        if filter is not None:
            params["filter"] = filter if isinstance(filter, str) else json.dumps(filter)
        if full_state:
            params["full_state"] = "true"
        return self._call(
            "GET", f"{CLIENT_V3}/sync", params=params, timeout=timeout_ms / 1000 + 60
        )

    @staticmethod
    def lazy_loading_filter(
        room_id: str | None = None, timeline_limit: int = 50
    ) -> JsonDict:
        """A sync filter with lazy-loaded members.

        Synapse leaves partial-state rooms out of /sync unless members are lazy-loaded."""
        room: JsonDict = {
            "state": {"lazy_load_members": True},
            "timeline": {"limit": timeline_limit, "lazy_load_members": True},
        }
        if room_id is not None:
            room["rooms"] = [room_id]
        return {"room": room}

    def wait_for_event(
        self,
        room_id: str,
        predicate: Callable[[JsonDict], bool],
        timeout: float = 30,
    ) -> JsonDict:
        """Sync until an event of ``room_id`` satisfying ``predicate`` shows up.

        Looks at the room's timeline and state in an initial sync (so recent
        events already there count) and then in incremental syncs.
        Raises :class:`TimeoutError`."""
        filt = json.dumps(self.lazy_loading_filter(room_id))
        deadline = time.monotonic() + timeout
        since: str | None = None
        while True:
            remaining = deadline - time.monotonic()
            wait_ms = 0 if since is None else max(0, min(int(remaining * 1000), 5000))
            resp = self.sync(since=since, filter=filt, timeout_ms=wait_ms)
            since = resp["next_batch"]
            for section in ("join", "leave", "invite"):
                room = resp.get("rooms", {}).get(section, {}).get(room_id)
                if not room:
                    continue
                events = list(room.get("state", {}).get("events", []))
                events += room.get("timeline", {}).get("events", [])
                events += room.get("invite_state", {}).get("events", [])
                for event in events:
                    if predicate(event):
                        return event
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.user_id}: no matching event in {room_id} after {timeout}s"
                )

    def wait_for_message(
        self, room_id: str, body: str, timeout: float = 30
    ) -> JsonDict:
        """Wait for an ``m.room.message`` with this ``body``."""
        return self.wait_for_event(
            room_id,
            lambda e: (
                e.get("type") == "m.room.message"
                and e.get("content", {}).get("body") == body
            ),
            timeout,
        )

    def wait_for_invite(self, room_id: str, timeout: float = 30) -> JsonDict:
        """Wait until this user is invited to ``room_id``."""
        return self.wait_for_event(
            room_id,
            lambda e: (
                e.get("type") == "m.room.member"
                and e.get("state_key") == self.user_id
                and e.get("content", {}).get("membership") == "invite"
            ),
            timeout,
        )
