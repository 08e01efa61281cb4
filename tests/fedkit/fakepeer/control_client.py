"""Synchronous test-side wrapper that runs the fake peer as a subprocess and calls
its control API (:mod:`tests.fedkit.fakepeer.control`)."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

REPO_ROOT = Path(__file__).resolve().parents[3]

#: Marker for "argument not given" where ``None`` has a meaning.
_UNSET: Any = object()


class FakePeerError(RuntimeError):
    """The fake peer failed to start or a control call failed."""


def _q(segment: str) -> str:
    return quote(segment, safe="")


class FakePeer:
    """Start/stop the fake peer process and call its control API."""

    def __init__(
        self, workdir: str, ca_dir: str, verify_requests: bool = False
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.ca_dir = os.path.abspath(ca_dir)
        self.verify_requests = verify_requests
        self.pid: int | None = None
        self.control_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        self._atexit_registered = False

    def another_client(self) -> FakePeer:
        """Another control client of this running peer, with an HTTP session of
        its own (``requests`` sessions are not meant to be shared by threads);
        it cannot stop the peer."""
        other = FakePeer(self.workdir, self.ca_dir, self.verify_requests)
        other.control_port = self.control_port
        other.pid = self.pid
        return other

    # ------------------------------------------------------------------
    # lifecycle

    @property
    def log_path(self) -> str:
        """The peer's log file."""
        return os.path.join(self.workdir, "fakepeer.log")

    @property
    def control_url(self) -> str:
        """Base URL of the control API."""
        if self.control_port is None:
            raise FakePeerError("fake peer not started")
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def ca_path(self) -> str:
        """The CA certificate fake servers' TLS certificates chain to."""
        return os.path.join(self.ca_dir, "ca.pem")

    def start(self, timeout: float = 30) -> FakePeer:
        """Launch the process and wait for ``ready.json``."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        # Create the CA and the listener certificate here, serially, so that
        # several peers sharing one CA directory never race to write them.
        from tests.fedkit.certs import KitCA

        KitCA(self.ca_dir).issue("fakepeer")
        ready = os.path.join(self.workdir, "ready.json")
        if os.path.exists(ready):
            os.unlink(ready)
        cmd = [
            sys.executable,
            "-m",
            "tests.fedkit.fakepeer",
            "--workdir",
            self.workdir,
            "--ca-dir",
            self.ca_dir,
        ]
        if self.verify_requests:
            cmd.append("--verify-requests")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(os.path.join(self.workdir, "fakepeer.stdout"), "ab") as out:
            self._proc = subprocess.Popen(
                cmd, cwd=str(REPO_ROOT), stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.pid = self._proc.pid
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise FakePeerError(f"fake peer exited early; see {self.workdir}")
            if os.path.exists(ready):
                with open(ready) as f:
                    info = json.load(f)
                if info.get("pid") == self.pid:
                    self.control_port = int(info["control_port"])
                    return self
            time.sleep(0.05)
        self.stop()
        raise FakePeerError(
            f"fake peer not ready after {timeout}s; see {self.log_path}"
        )

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; safe to call repeatedly."""
        proc, self._proc = self._proc, None
        self.control_port = None
        if proc is None:
            self._session.close()
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        self._session.close()

    def __enter__(self) -> FakePeer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------
    # plumbing

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Any = None,
        timeout: float = 600,
    ) -> Any:
        resp = self._session.request(
            method, self.control_url + path, json=body, params=params, timeout=timeout
        )
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text}
        if resp.status_code != 200:
            raise FakePeerError(
                f"{method} {path} -> {resp.status_code}: {data.get('error')}"
            )
        return data

    # ------------------------------------------------------------------
    # control endpoints

    def status(self) -> dict[str, Any]:
        """``GET /control/status``."""
        return self._call("GET", "/control/status")

    def servers(self) -> list[dict[str, Any]]:
        """``GET /control/servers``: every fake server."""
        return self._call("GET", "/control/servers")["servers"]

    def create_servers(self, count: int = 1) -> list[str]:
        """``POST /control/servers``: new fake servers; returns their names."""
        return self._call("POST", "/control/servers", {"count": count})["servers"]

    def notary(self) -> dict[str, Any]:
        """``POST /control/notary``: the peer's dedicated notary (a fake server in
        no room, made on the first call): ``{"server_name", "verify_keys"}``, as
        a ``trusted_key_servers`` entry
        (:func:`tests.fedkit.hsconfig.trusted_key_servers`)."""
        return self._call("POST", "/control/notary", {})

    def stop_server(self, name: str) -> dict[str, Any]:
        """``POST /control/servers/{name}/stop``."""
        return self._call("POST", f"/control/servers/{_q(name)}/stop", {})

    def start_server(self, name: str) -> dict[str, Any]:
        """``POST /control/servers/{name}/start``."""
        return self._call("POST", f"/control/servers/{_q(name)}/start", {})

    def create_room(
        self,
        room_version: str = "10",
        members: int = 10,
        servers: int = 1,
        name: str | None = "Fake room",
        topic: str | None = None,
        alias: bool = False,
        bans: int = 0,
        kicks: int = 0,
        invites: int = 0,
        knocks: int = 0,
        power_users: int = 0,
        acl: bool = False,
        history_visibility: str = "shared",
        join_rule: str | None = None,
        room_type: str | None = None,
    ) -> dict[str, Any]:
        """``POST /control/rooms``: build a synthetic room."""
        body = {
            "room_version": room_version,
            "members": members,
            "servers": servers,
            "name": name,
            "topic": topic,
            "alias": alias,
            "bans": bans,
            "kicks": kicks,
            "invites": invites,
            "knocks": knocks,
            "power_users": power_users,
            "acl": acl,
            "history_visibility": history_visibility,
            "join_rule": join_rule,
            "room_type": room_type,
        }
        return self._call("POST", "/control/rooms", body)

    def rooms(self) -> list[dict[str, Any]]:
        """``GET /control/rooms``."""
        return self._call("GET", "/control/rooms")["rooms"]

    def room(self, room_id: str) -> dict[str, Any]:
        """``GET /control/rooms/{roomId}``."""
        return self._call("GET", f"/control/rooms/{_q(room_id)}")

    def room_events(
        self, room_id: str, since: int = 0, limit: int = 100
    ) -> dict[str, Any]:
        """``GET /control/rooms/{roomId}/events``: the log, with event ids."""
        return self._call(
            "GET",
            f"/control/rooms/{_q(room_id)}/events",
            params={"since": since, "limit": limit},
        )

    def send_event(
        self,
        room_id: str,
        type: str,
        content: dict[str, Any],
        sender: str | None = None,
        state_key: str | None = None,
        destinations: list[str] | None = None,
        auth_events: list[str] | None = None,
        apply_state: bool = True,
        prev_events: list[str] | None = None,
    ) -> dict[str, Any]:
        """``POST /control/rooms/{roomId}/send``.

        ``prev_events``: used as given instead of the current forward
        extremities (e.g. an older event, to fork the room's DAG).

        ``auth_events``: used as given instead of those chosen against the
        peer's current state (e.g. a membership the sender no longer has).
        ``apply_state=False``: the event is logged and served but does not change
        the peer's current state (the resident treats it as rejected)."""
        body: dict[str, Any] = {"type": type, "content": content}
        if sender is not None:
            body["sender"] = sender
        if state_key is not None:
            body["state_key"] = state_key
        if destinations is not None:
            body["destinations"] = destinations
        if auth_events is not None:
            body["auth_events"] = auth_events
        if not apply_state:
            body["apply_state"] = False
        if prev_events is not None:
            body["prev_events"] = prev_events
        return self._call("POST", f"/control/rooms/{_q(room_id)}/send", body)

    def join_users(
        self,
        room_id: str,
        count: int,
        destinations: list[str] | None = None,
        servers: list[str] | None = None,
    ) -> dict[str, Any]:
        """``POST /control/rooms/{roomId}/join_users``; ``servers``: the fake
        servers the new members are on, in turn (default: the room's)."""
        body: dict[str, Any] = {"count": count}
        if servers is not None:
            body["servers"] = servers
        if destinations is not None:
            body["destinations"] = destinations
        return self._call("POST", f"/control/rooms/{_q(room_id)}/join_users", body)

    def hide_servers(self, room_id: str, servers: list[str]) -> list[str]:
        """``POST /control/rooms/{roomId}/hide_servers``: leave ``servers`` out of
        later partial ``/send_join`` answers' ``servers_in_room``."""
        body = {"servers": servers}
        path = f"/control/rooms/{_q(room_id)}/hide_servers"
        return list(self._call("POST", path, body)["hidden"])

    def edus(
        self, destination: str, edu_type: str, origin: str | None = None
    ) -> list[dict[str, Any]]:
        """The contents of the EDUs of type ``edu_type`` the fake server
        ``destination`` received (from ``origin``, if given), in arrival order."""
        found = []
        for txn in self.transactions(origin=origin, destination=destination):
            for edu in txn["body"].get("edus") or []:
                if isinstance(edu, dict) and edu.get("edu_type") == edu_type:
                    found.append(edu.get("content") or {})
        return found

    def send_edus(
        self, origin: str, destination: str, edus: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A transaction of ``edus`` (each ``{"edu_type", "content"}``) from the
        fake server ``origin`` to ``destination``."""
        import time as _time

        txn_id = f"edus{_time.time_ns()}"
        content = {
            "origin": origin,
            "origin_server_ts": int(_time.time() * 1000),
            "pdus": [],
            "edus": edus,
        }
        return self.federation_request(
            origin,
            destination,
            "PUT",
            f"/_matrix/federation/v1/send/{_q(txn_id)}",
            content,
        )

    def join(
        self,
        room_id: str,
        remote: str,
        server: str | None = None,
        user_localpart: str = "joiner",
        omit_members: Any = True,
        send_join_version: int = 2,
        include_body: bool = True,
        event_overrides: dict[str, Any] | None = None,
        template: dict[str, Any] | None = None,
        bad_signature: bool = False,
    ) -> dict[str, Any]:
        """``POST /control/join``: make_join + send_join against ``remote``.

        ``omit_members``: True/False, None (parameter left out) or a raw string
        sent verbatim. ``event_overrides``: top-level fields set on the make_join
        template before it is signed (e.g. another ``sender`` and ``state_key``,
        to send a join ``make_join`` would have refused). ``template``: a
        ``make_join`` answer obtained earlier, signed instead of asking for one
        (the result's ``make_join`` is then None), e.g. to send a join after the
        room's server ACL has come to deny ``server``. ``bad_signature``: corrupt
        the join's signatures once it is signed.
        """
        body: dict[str, Any] = {
            "room_id": room_id,
            "remote": remote,
            "user_localpart": user_localpart,
            "omit_members": omit_members,
            "send_join_version": send_join_version,
            "include_body": include_body,
        }
        if event_overrides:
            body["event_overrides"] = event_overrides
        if template is not None:
            body["template"] = template
        if bad_signature:
            body["bad_signature"] = True
        if server is not None:
            body["server"] = server
        return self._call("POST", "/control/join", body)

    def federation_request(
        self,
        server: str,
        destination: str,
        method: str,
        path: str,
        content: Any = None,
        timeout: float = 300,
        include_body: bool = True,
    ) -> dict[str, Any]:
        """``POST /control/federation_request``: a signed request from ``server``
        (``include_body=False``: the answer's ``body`` is None, only counted)."""
        body = {
            "server": server,
            "destination": destination,
            "method": method,
            "path": path,
            "content": content,
            "timeout": timeout,
            "include_body": include_body,
        }
        return self._call(
            "POST", "/control/federation_request", body, timeout=timeout + 60
        )

    def add_behaviour(
        self,
        path_regex: str,
        action: str,
        server: str = "*",
        seconds: float | None = None,
        status: int | None = None,
        count: int | None = None,
        omit: int | None = None,
        mode: str | None = None,
        skip: int | None = None,
    ) -> str:
        """``POST /control/behaviour``; returns the rule id. ``path_regex`` is
        searched in the request's path (raw and decoded) and in its decoded
        path with the query string. ``mode``: what a ``malformed`` answer gets
        wrong (``invalid_json``, the default, or ``wrong_shape``). ``skip``: let
        the first that many matching requests through untouched."""
        body = {
            "server": server,
            "path_regex": path_regex,
            "action": action,
            "seconds": seconds,
            "status": status,
            "count": count,
            "omit": omit,
            "mode": mode,
            "skip": skip,
        }
        return str(self._call("POST", "/control/behaviour", body)["id"])

    def behaviours(self) -> list[dict[str, Any]]:
        """``GET /control/behaviour``."""
        return self._call("GET", "/control/behaviour")["behaviours"]

    def clear_behaviours(self) -> int:
        """``DELETE /control/behaviour``."""
        return int(self._call("DELETE", "/control/behaviour")["cleared"])

    def remove_behaviour(self, rule_id: str) -> None:
        """``DELETE /control/behaviour/{id}``."""
        self._call("DELETE", f"/control/behaviour/{_q(rule_id)}")

    def transactions(
        self, origin: str | None = None, destination: str | None = None
    ) -> list[dict[str, Any]]:
        """``GET /control/transactions``."""
        params = {
            k: v for k, v in (("origin", origin), ("destination", destination)) if v
        }
        return self._call("GET", "/control/transactions", params=params)["transactions"]

    def clear_transactions(self) -> int:
        """``DELETE /control/transactions``."""
        return int(self._call("DELETE", "/control/transactions")["cleared"])

    def requests(
        self,
        server: str | None = None,
        origin: str | None = None,
        path_regex: str | None = None,
        since: float | None = None,
    ) -> list[dict[str, Any]]:
        """``GET /control/requests``: the incoming federation request log."""
        params = {
            k: v
            for k, v in (
                ("server", server),
                ("origin", origin),
                ("path_regex", path_regex),
                ("since", since),
            )
            if v is not None
        }
        return self._call("GET", "/control/requests", params=params)["requests"]

    def clear_requests(self) -> int:
        """``DELETE /control/requests``."""
        return int(self._call("DELETE", "/control/requests")["cleared"])

    def invites(self) -> list[dict[str, Any]]:
        """``GET /control/invites``: invites real servers sent to fake users."""
        return self._call("GET", "/control/invites")["invites"]
