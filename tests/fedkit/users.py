"""Users on a kit homeserver: registration with the shared-secret admin API."""

from __future__ import annotations

import hashlib
import hmac

import requests

from tests.fedkit.matrix_client import Client, MatrixError


def _registration_mac(
    shared_secret: str, nonce: str, localpart: str, password: str, admin: bool
) -> str:
    """The HMAC-SHA1 the shared-secret registration API expects."""
    mac = hmac.new(shared_secret.encode(), digestmod=hashlib.sha1)
    mac.update(
        b"\x00".join(
            p.encode()
            for p in (nonce, localpart, password, "admin" if admin else "notadmin")
        )
    )
    return mac.hexdigest()


def register_user(
    client_url: str,
    shared_secret: str,
    localpart: str,
    admin: bool = False,
    password: str = "pw",
) -> Client:
    """Register a user with the shared-secret admin API and return its client.

    ``client_url`` is the homeserver's client API base URL and ``shared_secret``
    its ``registration_shared_secret``."""
    url = client_url + "/_synapse/admin/v1/register"
    session = requests.Session()
    session.trust_env = False
    with session:
        r = session.get(url, timeout=30)
        r.raise_for_status()
        nonce = r.json()["nonce"]
        r = session.post(
            url,
            json={
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": _registration_mac(
                    shared_secret, nonce, localpart, password, admin
                ),
            },
            timeout=30,
        )
        if r.status_code != 200:
            raise MatrixError.from_response(r)
        body = r.json()
    return Client(client_url, body["user_id"], body["access_token"])
