"""Whether the bulk writers may run on this Synapse.

They write Synapse's tables directly, row for row as Synapse's own persistence
would; a Synapse release may add a column, a table or a cache that they do not
know. So they run only where their differential tests (the same events stored
through Synapse's path and through the bulk path leave the same rows) have
passed: the Synapse versions in :data:`BULK_TESTED_SYNAPSE_VERSIONS` *and* the
database schema version in :data:`BULK_TESTED_SCHEMA_VERSION`. Anywhere else the
module stores through Synapse's own persistence, and says so once in the log
and in the status endpoint (:attr:`BulkGate.reason`).
"""

from __future__ import annotations

import logging

import attr
import synapse

from synapse_partial_state.compat.patching import Version, synapse_version

logger = logging.getLogger(__name__)

#: Synapse releases the bulk writers' differential tests passed on (exact).
BULK_TESTED_SYNAPSE_VERSIONS: frozenset[Version] = frozenset({(1, 163, 2)})
#: ``synapse.storage.schema.SCHEMA_VERSION`` of those releases.
BULK_TESTED_SCHEMA_VERSION = 94

#: Said when the bulk writers are off (no version named: shown to anyone).
BULK_OFF_UNTESTED = (
    "bulk writers off: this Synapse release was not covered by their "
    "differential tests; storing through Synapse's own persistence"
)
BULK_OFF_CONFIG = "bulk writers off by configuration"


@attr.s(frozen=True, auto_attribs=True, slots=True)
class BulkGate:
    """The start-up verdict on the bulk writers."""

    #: Whether the bulk paths run in this process.
    allowed: bool
    #: Why not (None when allowed).
    reason: str | None = None


def configured(release: BulkGate, enabled: bool) -> BulkGate:
    """One writer's verdict: the release's (:func:`release_verdict`, decided
    once for every writer: it warns on an untested release), unless its setting turns it off."""
    if not enabled:
        logger.info("synapse_partial_state: %s", BULK_OFF_CONFIG)
        return BulkGate(False, BULK_OFF_CONFIG)
    return release


def release_verdict() -> BulkGate:
    """Whether this Synapse release and schema are ones the bulk writers were
    tested on (a warning when not)."""
    from synapse.storage.schema import SCHEMA_VERSION

    found = synapse_version()
    if found in BULK_TESTED_SYNAPSE_VERSIONS and (
        SCHEMA_VERSION == BULK_TESTED_SCHEMA_VERSION
    ):
        return BulkGate(True)
    logger.warning(
        "synapse_partial_state: Synapse %s (schema %s) is not one the bulk writers "
        "were tested on (%s, schema %s): the resync stores the room's state through "
        "Synapse's own persistence (correct, but several times slower)",
        synapse.__version__,
        SCHEMA_VERSION,
        ", ".join(".".join(map(str, v)) for v in sorted(BULK_TESTED_SYNAPSE_VERSIONS)),
        BULK_TESTED_SCHEMA_VERSION,
    )
    return BulkGate(False, BULK_OFF_UNTESTED)
