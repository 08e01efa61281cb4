"""X-Matrix request authentication and event hashing/signing helpers.

Event hashing, signing and event-id computation are delegated to Synapse's own
library code so that the events we produce are exactly what Synapse expects.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey, VerifyKey
from synapse.api.room_versions import RoomVersion
from synapse.crypto.event_signing import add_hashes_and_signatures
from synapse.events import make_event_from_dict

JsonDict = dict[str, Any]


def finalize_event(
    room_version: RoomVersion,
    event_dict: JsonDict,
    server_name: str,
    signing_key: SigningKey,
) -> str:
    """Add content hash and ``server_name``'s signature to ``event_dict`` in place.

    Returns the event id (reference hash based, room versions 3+).
    """
    add_hashes_and_signatures(room_version, event_dict, server_name, signing_key)
    return event_id_of(room_version, event_dict)


def event_id_of(room_version: RoomVersion, event_dict: JsonDict) -> str:
    """The event id of a (v3+ format) PDU dict, computed by Synapse."""
    return make_event_from_dict(event_dict, room_version).event_id


def add_signature(
    room_version: RoomVersion, event_dict: JsonDict, server_name: str, key: SigningKey
) -> None:
    """Add another server's signature (e.g. a countersignature) to a hashed event."""
    from synapse.crypto.event_signing import compute_event_signature

    sigs = compute_event_signature(room_version, event_dict, server_name, key)
    event_dict.setdefault("signatures", {}).update(sigs)


def corrupt_signatures(event_dict: JsonDict) -> None:
    """Replace every signature on ``event_dict`` by random bytes (in place)."""
    sigs = event_dict.get("signatures")
    if not isinstance(sigs, dict):
        return
    for server_sigs in sigs.values():
        if isinstance(server_sigs, dict):
            for key_id in list(server_sigs):
                server_sigs[key_id] = (
                    base64.b64encode(os.urandom(64)).decode().rstrip("=")
                )


# --------------------------------------------------------------------------
# X-Matrix


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def x_matrix_header(
    origin: str,
    destination: str,
    key_id: str,
    signing_key: SigningKey,
    method: str,
    uri: str,
    content: Any = None,
) -> str:
    """Build an ``Authorization: X-Matrix ...`` header value.

    ``uri`` is the request path plus query string exactly as sent on the wire.
    """
    request: JsonDict = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        request["content"] = content
    signed = sign_json(request, origin, signing_key)
    sig = signed["signatures"][origin][key_id]
    return (
        f"X-Matrix origin={_quote(origin)},destination={_quote(destination)},"
        f"key={_quote(key_id)},sig={_quote(sig)}"
    )


class XMatrixAuth:
    """A parsed X-Matrix ``Authorization`` header."""

    def __init__(
        self, origin: str, key_id: str, sig: str, destination: str | None
    ) -> None:
        self.origin = origin
        self.key_id = key_id
        self.sig = sig
        self.destination = destination

    def verify(
        self,
        verify_key: VerifyKey,
        method: str,
        uri: str,
        destination: str,
        content: Any = None,
    ) -> bool:
        """Check the signature against ``verify_key``; True when valid."""
        request: JsonDict = {
            "method": method,
            "uri": uri,
            "origin": self.origin,
            "destination": self.destination or destination,
        }
        if content is not None:
            request["content"] = content
        request["signatures"] = {self.origin: {self.key_id: self.sig}}
        try:
            verify_signed_json(request, self.origin, verify_key)
        except SignatureVerifyException:
            return False
        return True


def parse_x_matrix(header: bytes | None) -> XMatrixAuth | None:
    """Parse an X-Matrix header (using Synapse's parser); None if absent/invalid."""
    if not header or not header.startswith(b"X-Matrix"):
        return None
    from synapse.federation.transport.server._base import _parse_auth_header

    try:
        origin, key_id, sig, destination = _parse_auth_header(header)
    except Exception:
        return None
    return XMatrixAuth(origin, key_id, sig, destination)
