"""The module's configuration: one frozen object, validated once at start-up.

Every bad value raises :class:`synapse.module_api.errors.ConfigError` with a message
that names the key (as a dotted path under the module's ``config:``), the value found
and what is accepted, so that Synapse refuses to start with a useful line in its log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attr
from synapse.module_api.errors import ConfigError


@attr.s(frozen=True, auto_attribs=True, slots=True)
class StateCacheConfig:
    """How we serve ``/state`` and ``/state_ids`` as the resident server."""

    #: Serve them from the module's cache (false: Synapse's own servlets).
    enabled: bool = True
    #: Memory budget of the cache, in MiB (0: keep nothing between requests).
    max_size_mib: int = 256
    #: Answer the MSC2775 members-only ``/state`` variant (false: full answers).
    members_only: bool = True


@attr.s(frozen=True, auto_attribs=True, slots=True)
class ResidentConfig:
    """What we add to partial ``/send_join`` answers when we are the resident."""

    #: Add MSC2775 essentials on top of the MSC3706 partial state.
    enabled: bool = True
    #: Hero members (as clients compute room summaries), also for named rooms.
    heroes: bool = True
    #: Memberships that are power events: bans, and kicks still in force.
    bans_and_kicks: bool = True
    #: Pending invites and knocks.
    invites_and_knocks: bool = True
    #: Joined members per server in the room (0, the default, disables). Off by
    #: default: every extra server costs the joiner a signing-key fetch inside
    #: its /join (measured: /join 3.5x slower on a 10,000-member, 200-server
    #: room), and MSC3706's ``servers_in_room`` already says where to send.
    members_per_server: int = 0
    #: Members named in ``m.room.power_levels`` ``users``.
    power_level_users: bool = True
    #: Add an ``org.matrix.msc2775.summary`` block (heroes, member counts).
    summary: bool = True
    #: Cap on the number of extra member events added to one answer.
    max_extra_members: int = 300
    #: While this process answers a ``/send_join``, the federation sender's
    #: sending of new events to other servers (and Synapse's presence
    #: handler's pass over the new joins) waits for the answer to be sent, at
    #: most this long (0: it does not wait). In one process they share a
    #: reactor, and a big room's fan-out (the join to every server in the room)
    #: would otherwise delay the answer the joining user waits for. The first
    #: answer after a big room's resync reads its essentials from the database
    #: (2.5 s at 100,000 members on a 2-core machine): 2 s was too short.
    fanout_hold_seconds: float = 5.0
    #: Work out the servers in rooms with at least this many joined members
    #: ahead of their joiners: once this process has started and after each
    #: resync (0 disables). Synapse computes them on first use, from every
    #: membership in the room (0.6-0.7 s at 100,000 members), which would
    #: otherwise fall inside the first joiner's ``/send_join``.
    warm_hosts_min_members: int = 10000
    #: Cached, streamed ``/state`` and ``/state_ids`` answers.
    state_cache: StateCacheConfig = StateCacheConfig()


@attr.s(frozen=True, auto_attribs=True, slots=True)
class ResyncConfig:
    """The joining side's background resync engine."""

    #: Replace Synapse's resync loop with this module's engine.
    enabled: bool = True
    #: First wait after every known server failed, in seconds.
    initial_backoff_seconds: float = 5.0
    #: Ceiling of the exponential back-off, in seconds.
    max_backoff_seconds: float = 600.0
    #: A new resync's first request waits this long after the join, so that
    #: the joining user's first requests (the room's first sync, a first
    #: message) are served before the resync's heavy first steps.
    start_delay_seconds: float = 0.4
    #: Once a module resident's partial ``/send_join`` answer has arrived, how
    #: long the join waits for the signing keys of its MSC2775 essentials (the
    #: members named for clients, which the join itself does not need); those
    #: still without keys then come with the resync instead.
    essentials_key_wait_seconds: float = 0.25
    #: Fetch, check and store the state at the join with the engine's own bulk
    #: path (off: Synapse's per-event fetch, as stock).
    fast_state_fetch: bool = True
    #: Processes checking signatures in bulk; 0 a thread of this process; -1 a
    #: thread below 4 cores, else one process per core beyond two (at most 4).
    verify_workers: int = -1
    #: Write a whole room's members into its current state in a few large
    #: statements when its state becomes full (the bulk finish; off: Synapse's
    #: own transaction, a statement per member and table). Runs only on the
    #: Synapse releases its differential tests passed on.
    bulk_finish: bool = True
    #: Store the state at the join in large transactions with Synapse's own
    #: persistence functions (the bulk outlier writer; off: Synapse's
    #: ``_auth_and_persist_outliers``, 100 events per transaction). Runs only on
    #: the Synapse releases its differential tests passed on.
    bulk_writer: bool = True
    #: Let Synapse's user directory, room statistics and presence work through
    #: a big room's membership changes in batches (events read ahead, a public
    #: room's new members written to the user directory in bulk; off: one at a
    #: time, as stock). Runs only on the Synapse releases its differential
    #: tests passed on.
    bulk_state_deltas: bool = True


#: Values of ``clients.members_during_resync``.
MEMBERS_BLOCK = "block"
MEMBERS_PARTIAL = "partial"


@attr.s(frozen=True, auto_attribs=True, slots=True)
class ClientsConfig:
    """What clients may read of a room while it is partial."""

    #: ``/members`` and ``/joined_members`` of a partial-state room: ``block``
    #: until complete (stock's, and the spec tests' behaviour), or ``partial``:
    #: answer at once with the members known so far, marked as syncing, for an
    #: unencrypted room (an encrypted room always blocks).
    members_during_resync: str = MEMBERS_BLOCK
    #: How long a ``/messages`` page of a partial-state room waits for history
    #: from the resident (its backfill) before answering with the events here
    #: and ``end``; the backfill goes on and the client's next page gets it.
    #: A page that would be empty waits for the backfill whatever this says.
    history_wait_seconds: float = 0.5


@attr.s(frozen=True, auto_attribs=True, slots=True)
class PartialStateConfig:
    """The whole module configuration."""

    resident: ResidentConfig = ResidentConfig()
    resync: ResyncConfig = ResyncConfig()
    clients: ClientsConfig = ClientsConfig()
    #: On a Synapse outside the tested range, install the patches anyway (the
    #: default there: none, Synapse runs as stock).
    allow_untested_synapse: bool = False
    #: On a Synapse outside the tested range, stop Synapse at start-up instead.
    refuse_untested_synapse: bool = False


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


class _Reader:
    """Reads one mapping of options, remembering where it is for messages."""

    def __init__(self, raw: Any, path: tuple[str, ...]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{self._where(path)}: expected a mapping of options, "
                f"found {_describe(raw)}"
            )
        self._raw = raw
        self._path = path
        self._seen: set[str] = set()

    @staticmethod
    def _where(path: tuple[str, ...]) -> str:
        return "partial-state module config" + ("." + ".".join(path) if path else "")

    def _key(self, key: str) -> str:
        return ".".join(self._path + (key,))

    def _fail(self, key: str, value: Any, accepted: str) -> ConfigError:
        return ConfigError(
            f"partial-state module config: '{self._key(key)}' is {_describe(value)}; "
            f"expected {accepted}"
        )

    def boolean(self, key: str, default: bool) -> bool:
        self._seen.add(key)
        value = self._raw.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, value, "true or false")
        return value

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        self._seen.add(key)
        value = self._raw.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not minimum <= value <= maximum
        ):
            raise self._fail(key, value, f"a whole number from {minimum} to {maximum}")
        return value

    def seconds(
        self, key: str, default: float, minimum: float, maximum: float
    ) -> float:
        self._seen.add(key)
        value = self._raw.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not minimum <= value <= maximum
        ):
            raise self._fail(
                key, value, f"a number of seconds from {minimum:g} to {maximum:g}"
            )
        return float(value)

    def choice(self, key: str, default: str, accepted: tuple[str, ...]) -> str:
        self._seen.add(key)
        value = self._raw.get(key, default)
        if not isinstance(value, str) or value not in accepted:
            raise self._fail(key, value, "one of " + ", ".join(map(repr, accepted)))
        return value

    def section(self, key: str) -> _Reader:
        self._seen.add(key)
        return _Reader(self._raw.get(key), self._path + (key,))

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self._raw if k not in self._seen)
        if unknown:
            raise ConfigError(
                f"{self._where(self._path)}: unknown option(s) "
                + ", ".join(repr(k) for k in unknown)
                + "; known options are "
                + ", ".join(repr(k) for k in sorted(self._seen))
            )


def _parse_resident(r: _Reader) -> ResidentConfig:
    d = ResidentConfig()
    parsed = ResidentConfig(
        enabled=r.boolean("enabled", d.enabled),
        heroes=r.boolean("heroes", d.heroes),
        bans_and_kicks=r.boolean("bans_and_kicks", d.bans_and_kicks),
        invites_and_knocks=r.boolean("invites_and_knocks", d.invites_and_knocks),
        members_per_server=r.integer("members_per_server", d.members_per_server, 0, 10),
        power_level_users=r.boolean("power_level_users", d.power_level_users),
        summary=r.boolean("summary", d.summary),
        max_extra_members=r.integer("max_extra_members", d.max_extra_members, 0, 10000),
        fanout_hold_seconds=r.seconds(
            "fanout_hold_seconds", d.fanout_hold_seconds, 0, 60
        ),
        warm_hosts_min_members=r.integer(
            "warm_hosts_min_members", d.warm_hosts_min_members, 0, 100_000_000
        ),
        state_cache=_parse_state_cache(r.section("state_cache")),
    )
    r.finish()
    return parsed


def _parse_state_cache(r: _Reader) -> StateCacheConfig:
    d = StateCacheConfig()
    parsed = StateCacheConfig(
        enabled=r.boolean("enabled", d.enabled),
        max_size_mib=r.integer("max_size_mib", d.max_size_mib, 0, 1048576),
        members_only=r.boolean("members_only", d.members_only),
    )
    r.finish()
    return parsed


def _parse_resync(r: _Reader) -> ResyncConfig:
    d = ResyncConfig()
    parsed = ResyncConfig(
        enabled=r.boolean("enabled", d.enabled),
        initial_backoff_seconds=r.seconds(
            "initial_backoff_seconds", d.initial_backoff_seconds, 0.1, 3600
        ),
        max_backoff_seconds=r.seconds(
            "max_backoff_seconds", d.max_backoff_seconds, 1, 86400
        ),
        start_delay_seconds=r.seconds(
            "start_delay_seconds", d.start_delay_seconds, 0, 60
        ),
        essentials_key_wait_seconds=r.seconds(
            "essentials_key_wait_seconds", d.essentials_key_wait_seconds, 0, 5
        ),
        fast_state_fetch=r.boolean("fast_state_fetch", d.fast_state_fetch),
        verify_workers=r.integer("verify_workers", d.verify_workers, -1, 64),
        bulk_finish=r.boolean("bulk_finish", d.bulk_finish),
        bulk_writer=r.boolean("bulk_writer", d.bulk_writer),
        bulk_state_deltas=r.boolean("bulk_state_deltas", d.bulk_state_deltas),
    )
    r.finish()
    if parsed.max_backoff_seconds < parsed.initial_backoff_seconds:
        raise ConfigError(
            "partial-state module config: 'resync.max_backoff_seconds' "
            f"({parsed.max_backoff_seconds:g}) is below "
            f"'resync.initial_backoff_seconds' ({parsed.initial_backoff_seconds:g}); "
            "expected max_backoff_seconds >= initial_backoff_seconds"
        )
    return parsed


def _parse_clients(r: _Reader) -> ClientsConfig:
    d = ClientsConfig()
    parsed = ClientsConfig(
        members_during_resync=r.choice(
            "members_during_resync",
            d.members_during_resync,
            (MEMBERS_BLOCK, MEMBERS_PARTIAL),
        ),
        history_wait_seconds=r.seconds(
            "history_wait_seconds", d.history_wait_seconds, 0, 600
        ),
    )
    r.finish()
    return parsed


def parse_config(raw: Any) -> PartialStateConfig:
    """Validate the ``config:`` mapping of the module's entry in ``modules:``."""
    r = _Reader(raw, ())
    d = PartialStateConfig()
    parsed = PartialStateConfig(
        resident=_parse_resident(r.section("resident")),
        resync=_parse_resync(r.section("resync")),
        clients=_parse_clients(r.section("clients")),
        allow_untested_synapse=r.boolean(
            "allow_untested_synapse", d.allow_untested_synapse
        ),
        refuse_untested_synapse=r.boolean(
            "refuse_untested_synapse", d.refuse_untested_synapse
        ),
    )
    r.finish()
    if parsed.allow_untested_synapse and parsed.refuse_untested_synapse:
        raise ConfigError(
            "partial-state module config: 'allow_untested_synapse' and "
            "'refuse_untested_synapse' are both true; expected at most one of them "
            "(allow: install the patches on an untested Synapse; refuse: stop "
            "Synapse there; neither: start with the patches off)"
        )
    return parsed
