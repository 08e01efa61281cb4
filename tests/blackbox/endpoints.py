"""The module's HTTP endpoints, as the black-box tests reach them."""

from __future__ import annotations

from typing import Any

from tests.fedkit.matrix_client import Client

#: The admin API (a server admin's token; listeners serving the client API).
ADMIN = "/_synapse/admin/v1/partial_state/rooms"
#: The status endpoint: minimal for anyone, full for a server admin.
STATUS = "/_synapse/client/partial_state/v1/status"


def full_status(admin: Client) -> dict[str, Any]:
    """The status endpoint's full answer (``admin`` must be a server admin)."""
    status, body = admin.get(STATUS)
    assert status == 200, body
    assert "patches" in body, f"not the full answer: {body}"
    return body


def patch_targets(admin: Client) -> set[str]:
    """The last component of every patch the status endpoint lists."""
    return {p["target"].rsplit(".", 1)[-1] for p in full_status(admin)["patches"]}
