"""The notary role (the spec's "Querying Keys Through Another Server").

Every fake server answers ``POST /_matrix/key/v2/query`` and
``GET /_matrix/key/v2/query/{serverName}`` as a notary: the self-signed key
responses of the servers asked for, each countersigned by the answering server's
own key. The keys of the peer's fake servers are known; those of other servers
(the kit's real homeservers) are fetched from them (``/_matrix/key/v2/server``,
their self-signature checked) and kept. A response is only given when it is
valid until the query's ``minimum_valid_until_ts`` (the notary's clock when the
query names none); a kept response that is not is fetched again. As a Synapse
notary does, a query naming no key id for another server is answered from what
is kept only (one slow server does not hold up a batch of many). Servers the
notary cannot vouch for are left out of the answer, as the spec says.

``POST /control/notary`` makes a dedicated fake server (in no room) whose name
and verify keys go in a homeserver's ``trusted_key_servers``
(:func:`tests.fedkit.hsconfig.trusted_key_servers`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from .keys import ServerKey, notarise

if TYPE_CHECKING:
    from .peer import Peer

logger = logging.getLogger("fakepeer")

#: Seconds a notary waits for another server's own key response.
REMOTE_KEY_TIMEOUT_S = 10


class QueryError(ValueError):
    """A malformed key query (answered 400)."""


#: What a query asks of one server: (minimum valid-until ms, whether it named
#: key ids).
Wanted = tuple[int, bool]


def parse_batch_query(body: Any, now_ms: int) -> dict[str, Wanted]:
    """``{server name: (minimum valid-until ms, key ids named)}`` of a ``POST
    /_matrix/key/v2/query`` body. Each key id's ``minimum_valid_until_ts``
    defaults to ``now_ms``; a response covers all of a server's keys, so the
    largest one asked counts."""
    if not isinstance(body, dict) or not isinstance(body.get("server_keys"), dict):
        raise QueryError("'server_keys' must be an object")
    wanted: dict[str, Wanted] = {}
    for name, key_ids in body["server_keys"].items():
        if not isinstance(key_ids, dict):
            raise QueryError(f"server_keys[{name!r}] must be an object")
        minimum = now_ms
        for key_id, criteria in key_ids.items():
            if not isinstance(criteria, dict):
                raise QueryError(f"criteria of {name!r} {key_id!r} must be an object")
            ts = criteria.get("minimum_valid_until_ts")
            if ts is None:
                continue
            if not isinstance(ts, int) or isinstance(ts, bool):
                raise QueryError("minimum_valid_until_ts must be an integer")
            minimum = max(minimum, ts)
        wanted[name] = (minimum, bool(key_ids))
    return wanted


class Notary:
    """The notary answers of every fake server of ``peer``."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        #: other servers' self-signed key responses, as fetched
        self._remote: dict[str, dict[str, Any]] = {}
        self.dedicated: str | None = None

    def dedicated_server(self) -> dict[str, Any]:
        """The dedicated notary (made on first use): its name and verify keys."""
        if self.dedicated is None:
            self.dedicated = self.peer.new_server().name
        key = self.peer.key_for(self.dedicated)
        return {"server_name": key.server_name, "verify_keys": key.verify_keys_json()}

    async def answer(self, notary: ServerKey, wanted: dict[str, Wanted]) -> bytes:
        """The ``{"server_keys": [...]}`` body ``notary`` gives for ``wanted``
        (server name -> minimum valid-until ms, key ids named)."""
        parts: list[bytes] = []
        remote: list[tuple[str, int]] = []
        for name, (minimum, named) in wanted.items():
            srv = self.peer.servers.get(name)
            if srv is None:
                kept = self._remote.get(name)
                if named:
                    remote.append((name, minimum))
                elif kept is not None and kept.get("valid_until_ts", 0) >= minimum:
                    parts.append(notarise(kept, notary))
                continue
            if srv.key is None or srv.key.key_response()["valid_until_ts"] < minimum:
                continue  # a fake server's keys do not change: nothing fresher
            parts.append(srv.key.notarised_bytes(notary))
        for name, minimum in remote:
            response = await self._remote_response(name, minimum)
            if response is not None:
                parts.append(notarise(response, notary))
        return b'{"server_keys":[' + b",".join(parts) + b"]}"

    async def _remote_response(self, name: str, minimum: int) -> dict[str, Any] | None:
        """Another server's own key response valid until ``minimum``: kept, or
        fetched from it (None if it cannot be had)."""
        kept = self._remote.get(name)
        if kept is not None and kept.get("valid_until_ts", 0) >= minimum:
            return kept
        try:
            resp = await self.peer.client.request(
                None,
                name,
                "GET",
                "/_matrix/key/v2/server",
                timeout=REMOTE_KEY_TIMEOUT_S,
            )
            body = resp.json()
            if resp.status != 200 or not _self_signed(body, name):
                logger.warning("notary: no valid key response from %s", name)
                return None
        except Exception as e:  # noqa: BLE001 - the server is left out
            logger.warning("notary: key fetch from %s failed: %r", name, e)
            return None
        self._remote[name] = body
        valid_until = body.get("valid_until_ts")
        if not isinstance(valid_until, int) or valid_until < minimum:
            return None
        return body  # type: ignore[no-any-return]


def _self_signed(body: Any, name: str) -> bool:
    """Whether ``body`` is ``name``'s key response, signed by one of its keys."""
    if not isinstance(body, dict) or body.get("server_name") != name:
        return False
    try:
        for key_id, data in (body.get("verify_keys") or {}).items():
            if key_id in (body.get("signatures") or {}).get(name, {}):
                vk = decode_verify_key_bytes(key_id, decode_base64(data["key"]))
                verify_signed_json(body, name, vk)
                return True
    except (SignatureVerifyException, KeyError, ValueError, TypeError):
        return False
    return False


def now_ms() -> int:
    return int(time.time() * 1000)
