"""Signing keys and key-server responses for fake servers."""

from __future__ import annotations

import json
import time
from typing import Any

from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json
from signedjson.types import SigningKey, VerifyKey

#: ``valid_until_ts`` advertised for every fake key: far in the future.
KEY_VALID_UNTIL_MS = int((time.time() + 10 * 365 * 86400) * 1000)


class ServerKey:
    """The ed25519 key of one fake server plus its cached key response."""

    def __init__(self, server_name: str, version: str | None = None) -> None:
        self.server_name = server_name
        self.signing_key: SigningKey = generate_signing_key(version or "fake1")
        self.verify_key: VerifyKey = get_verify_key(self.signing_key)
        self.key_id = f"{self.signing_key.alg}:{self.signing_key.version}"
        self._key_response: dict[str, Any] | None = None
        self._key_response_bytes: bytes | None = None
        #: notary name -> this server's key response countersigned by it
        self._notarised: dict[str, bytes] = {}

    def key_response(self) -> dict[str, Any]:
        """The self-signed ``/_matrix/key/v2/server`` body (cached)."""
        if self._key_response is None:
            body = {
                "server_name": self.server_name,
                "valid_until_ts": KEY_VALID_UNTIL_MS,
                "verify_keys": {
                    self.key_id: {"key": encode_verify_key_base64(self.verify_key)}
                },
                "old_verify_keys": {},
            }
            self._key_response = sign_json(body, self.server_name, self.signing_key)
        return self._key_response

    def key_response_bytes(self) -> bytes:
        """:meth:`key_response` as JSON bytes (cached)."""
        if self._key_response_bytes is None:
            self._key_response_bytes = json.dumps(self.key_response()).encode()
        return self._key_response_bytes

    def verify_keys_json(self) -> dict[str, str]:
        """``{key id: unpadded base64 verify key}``: what a homeserver that trusts
        this server as a notary puts in ``trusted_key_servers``."""
        return {self.key_id: encode_verify_key_base64(self.verify_key)}

    def notarised_bytes(self, notary: ServerKey) -> bytes:
        """This server's key response countersigned by ``notary``, as JSON bytes
        (cached per notary)."""
        cached = self._notarised.get(notary.server_name)
        if cached is None:
            cached = notarise(self.key_response(), notary)
            self._notarised[notary.server_name] = cached
        return cached


def notarise(key_response: dict[str, Any], notary: ServerKey) -> bytes:
    """A server's self-signed key response countersigned by ``notary`` (as is,
    when it is the notary's own), as JSON bytes."""
    body = json.loads(json.dumps(key_response))
    if notary.server_name != key_response.get("server_name"):
        body = sign_json(body, notary.server_name, notary.signing_key)
    return json.dumps(body).encode()
