"""Names the module adds to the federation wire and to the client API (MSC2775,
unstable prefix).

Peers that do not know them ignore them: a stock resident answers in full, a stock
joiner reads the extra members as more partial state; clients that do not know
them ignore an unknown field of a ``/sync`` room object.
"""

import re

#: Query parameter of ``GET /state``: member events only; also the marker field of
#: such an answer.
MEMBERS_ONLY_PARAM = "org.matrix.msc2775.members_only"

#: Field of a partial ``/send_join`` answer: heroes and member counts.
SUMMARY_FIELD = "org.matrix.msc2775.summary"

#: Field of a ``/make_join`` answer from a module resident: the servers whose
#: signing keys checking the partial ``/send_join`` answer will need (the senders
#: of the room's non-member state and of its MSC2775 essentials), so that a
#: module joiner fetches them while the resident prepares that answer. A hint: a
#: joiner fetches whatever else it needs as usual.
SIGNING_SERVERS_FIELD = "org.matrix.msc2775.signing_servers"

#: Most servers a joiner takes from :data:`SIGNING_SERVERS_FIELD` (and a resident
#: puts there).
MAX_SIGNING_SERVERS = 1000

#: Field of a room object under ``rooms.join`` in ``/sync`` (and of a sliding sync
#: room object): true while the server is still fetching the room's full state,
#: false once in the first incremental lazy-loading ``/sync`` after it completed.
SYNCING_FIELD = "org.matrix.msc2775.syncing"

#: Unstable prefix of the module's client API (MSC2775).
CLIENT_UNSTABLE_PREFIX = "/_matrix/client/unstable/org.matrix.msc2775"

#: Longest event ID Synapse accepts (``synapse.api.constants.MAX_..._LENGTH``: 255).
MAX_EVENT_ID_LENGTH = 255


class WireError(ValueError):
    """A federation answer that is not of the shape the spec gives it."""


def parse_state_ids(body: object) -> tuple[list[str], list[str]]:
    """``(pdu_ids, auth_chain_ids)`` of a ``/state_ids`` answer, checked as
    Synapse checks it (both lists of strings; ``auth_chain_ids`` may be left
    out) and each ID a plausible event ID (a non-empty string of at most
    :data:`MAX_EVENT_ID_LENGTH` characters starting with ``$``). Raises
    :class:`WireError` saying what is wrong."""
    if not isinstance(body, dict):
        raise WireError(f"/state_ids answer is not an object but {type(body).__name__}")
    found = []
    for name, default in (("pdu_ids", None), ("auth_chain_ids", [])):
        ids = body.get(name, default)
        if not isinstance(ids, list):
            raise WireError(f"invalid {name!r} in /state_ids answer: not a list")
        for event_id in ids:
            if not (
                isinstance(event_id, str)
                and 1 < len(event_id) <= MAX_EVENT_ID_LENGTH
                and event_id.startswith("$")
            ):
                raise WireError(
                    f"invalid {name!r} in /state_ids answer: {str(event_id)[:80]!r} "
                    "is not an event ID"
                )
        found.append(ids)
    return found[0], found[1]


#: A server name as the spec allows it (hostname or IP literal, optional port).
_SERVER_NAME = re.compile(
    r"[A-Za-z0-9.\-]{1,255}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?"
)


def parse_signing_servers(body: object) -> list[str]:
    """The server names of a ``/make_join`` answer's :data:`SIGNING_SERVERS_FIELD`,
    in order, without repeats, at most :data:`MAX_SIGNING_SERVERS`; anything that
    is not a server name is left out, and a missing or malformed field gives none
    (it is a hint)."""
    if not isinstance(body, dict):
        return []
    servers = body.get(SIGNING_SERVERS_FIELD)
    if not isinstance(servers, list):
        return []
    found: dict[str, None] = {}
    for server in servers:
        if len(found) >= MAX_SIGNING_SERVERS:
            break
        if isinstance(server, str) and _SERVER_NAME.fullmatch(server):
            found.setdefault(server, None)
    return list(found)
