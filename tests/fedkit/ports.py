"""Free TCP ports on loopback for test servers.

Ports are drawn at random from below the kernel's ephemeral range, so that
outgoing connections (which take their source port from that range) cannot
grab a port between the moment we pick it and the moment Synapse binds it.
Each port is checked by binding it once, and never handed out twice by the
same process. Two test processes picking the same port at the same instant is
possible but unlikely; :class:`~tests.fedkit.homeserver.Homeserver` retries its
first start with new ports if Synapse reports ``Address already in use``.
"""

from __future__ import annotations

import random
import socket
import threading

_LOW = 20000
_HIGH = 32000

_lock = threading.Lock()
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing is bound to right now."""
    high = min(_HIGH, _ephemeral_low())
    with _lock:
        for _ in range(1000):
            port = random.randrange(_LOW, high)
            if port in _handed_out:
                continue
            if _bindable(port, host):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free port found on {host} in [{_LOW}, {high})")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct free ports."""
    return [free_port(host) for _ in range(count)]
