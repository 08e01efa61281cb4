"""The resident side of a measurement: what serving a joiner costs the resident.

The fake peer measures it after hs2's join (``Settings.resident``): a partial
``send_join`` (``omit_members=true``) against the real server that holds the room
(hs1, or hs2 when there is no hs1); ``/state_ids`` then ``/state`` at that join
event (as a resyncing joiner asks them), ``/state`` there again, and ``/state`` at
a second probe join's event (a state group no one asked about: cold). Then a real
homeserver of the same variant (hs3) joins the room through the resident, and its
user's ``/join`` is timed: what a joining user waits for, end to end (hs3 is
stopped after it, during its resync).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from bench import measure
from tests.fedkit.fakepeer.control_client import FakePeer
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client

MIB = measure.MIB


def measure_resident(
    peer: FakePeer,
    room_id: str,
    res_hs: Homeserver,
    rec: dict[str, Any],
    res_rec: dict[str, Any],
    phase: Callable[[str], None],
    start_joiner: Callable[[], Client] | None = None,
    idle_max_s: float = 600.0,
) -> None:
    """The resident side: probe joins and state requests against ``res_hs``;
    then, with ``start_joiner`` (it starts a homeserver and registers a user
    there), that user's ``/join`` through ``res_hs``."""
    res_rec["room"] = rec["room"]
    res_rec["resident_server"] = res_hs.name
    phase(f"resident side: waiting for {res_hs.name} to be idle")
    res_rec["idle_wait_s"] = round(
        measure.wait_until_idle(res_hs.cpu_seconds, max_wait=idle_max_s), 1
    )
    phase(f"resident side: partial send_join to {res_hs.name}")
    off = res_hs.log_offset()
    # Memory and CPU the resident spends serving the probe joins and the state
    # requests below (its peak counter reset now; growth over its RSS now).
    res_window = measure.ResourceWindow(res_hs)
    res_window.start()
    rss_before = res_hs.rss_bytes()
    j = _probe_join(peer, room_id, res_hs, res_rec)
    _state_requests(peer, room_id, res_hs, j, res_rec["metrics"], phase)
    served_res = res_window.stop()
    rm = res_rec["metrics"]
    rm["resident_peak_rss_mib"] = served_res["peak_rss_mib"]
    rm["resident_rss_growth_mib"] = round(
        max(0.0, served_res["peak_rss_mib"] - rss_before / MIB), 1
    )
    rm["resident_serve_cpu_s"] = served_res["cpu_s"]

    time.sleep(0.5)  # log flush
    _record_probe_serving(res_rec, res_hs, off, j["server"])
    if start_joiner is not None:
        phase(f"resident side: a real joiner (hs3) joins via {res_hs.name}")
        joiner = start_joiner()
        t = time.monotonic()
        joiner.join(room_id, via=[res_hs.server_name], timeout=600)
        rm["real_join_s"] = round(time.monotonic() - t, 3)


def _probe_join(
    peer: FakePeer, room_id: str, res_hs: Homeserver, res_rec: dict[str, Any]
) -> dict[str, Any]:
    """A partial send_join (``omit_members``) from the fake peer to ``res_hs``."""
    j = peer.join(
        room_id,
        res_hs.server_name,
        user_localpart="benchprobe",
        omit_members=True,
        include_body=False,
    )
    sj = j.get("send_join") or {}
    if sj.get("status") != 200:
        raise RuntimeError(f"send_join to {res_hs.name} failed: {j.get('make_join')}")
    rm = res_rec["metrics"]
    rm["send_join_s"] = round(sj["seconds"], 3)
    rm["send_join_mib"] = round(sj["bytes"] / MIB, 3)
    res_rec["send_join_summary"] = sj.get("summary")
    return j


def _state_requests(
    peer: FakePeer,
    room_id: str,
    res_hs: Homeserver,
    j: dict[str, Any],
    rm: dict[str, Any],
    phase: Callable[[str], None],
) -> None:
    """``/state_ids`` and ``/state`` at the probe join's event (twice), then
    ``/state`` at a second probe join's event (cold)."""
    q_room = quote(room_id, safe="")

    def state_request(name: str, endpoint: str, event_id: str) -> None:
        phase(f"resident side: /{endpoint} from {res_hs.name}")
        r = peer.federation_request(
            j["server"],
            res_hs.server_name,
            "GET",
            f"/_matrix/federation/v1/{endpoint}/{q_room}"
            f"?event_id={quote(event_id, safe='')}",
        )
        if r["status"] != 200:
            raise RuntimeError(f"/{endpoint} from {res_hs.name}: {r['status']}")
        rm[f"{name}_s"] = round(r["seconds"], 3)
        if name in ("state_ids", "state"):
            rm[f"{name}_mib"] = round(r["bytes"] / MIB, 3)

    # As a resyncing joiner asks: /state_ids, then /state at the same event.
    state_request("state_ids", "state_ids", j["event_id"])
    state_request("state", "state", j["event_id"])
    state_request("state_repeat", "state", j["event_id"])
    # And /state at an event no one asked about yet: a second probe join makes a
    # new state group.
    phase(f"resident side: a second partial send_join to {res_hs.name}")
    j2 = peer.join(
        room_id,
        res_hs.server_name,
        server=j["server"],
        user_localpart="benchprobe2",
        omit_members=True,
        include_body=False,
    )
    sj2 = j2.get("send_join") or {}
    if sj2.get("status") != 200:
        raise RuntimeError(f"second send_join to {res_hs.name} failed")
    rm["send_join_2_s"] = round(sj2["seconds"], 3)
    state_request("state_cold", "state", j2["event_id"])


def _record_probe_serving(
    res_rec: dict[str, Any], res_hs: Homeserver, off: int, origin: str
) -> None:
    """From the resident's access log: its own time for each probe request."""
    served = measure.access_requests(
        measure.read_log_lines(res_hs.log_path, off), origin=origin
    )
    res_rec["endpoints_resident"] = measure.aggregate(served)
    # The resident's own time for each of the requests above, in order.
    labels = {
        "make_join": ["make_join", "make_join_2"],
        "send_join": ["send_join", "send_join_2"],
        "state_ids": ["state_ids"],
        "state": ["state", "state_repeat", "state_cold"],
    }
    rm = res_rec["metrics"]
    for req in served:
        queue = labels.get(req.endpoint)
        if queue:
            rm[f"serve:{queue.pop(0)}"] = round(req.seconds, 3)
