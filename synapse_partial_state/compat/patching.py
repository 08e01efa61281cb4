"""The version gate, the patch registry and the one way of installing a wrapper.

Every patch the package installs is recorded here (:data:`INSTALLED_PATCHES`) with
what it replaces and the Synapse version it was checked against; the status
endpoint and the start-up log line list them. The seams that only place the
module's own endpoints (:mod:`.web`) are recorded apart (:data:`INSTALLED_MOUNTS`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attr
import synapse
from synapse.module_api import ModuleApi
from synapse.module_api.errors import ConfigError

if TYPE_CHECKING:
    from synapse.server import HomeServer
    from synapse.storage.databases.main import DataStore

logger = logging.getLogger(__name__)

Version = tuple[int, int, int]

#: The Synapse releases this module was tested against: (lowest, first excluded).
TESTED_SYNAPSE_RANGE: tuple[Version, Version] = ((1, 163, 0), (1, 164, 0))

#: Environment variable that replaces :data:`TESTED_SYNAPSE_RANGE` for this process,
#: as ``LOWEST,FIRST_EXCLUDED`` (e.g. ``1.163.0,1.164.0``). A test and operations
#: override, read only here: the test kit uses it to start a homeserver whose
#: Synapse is "untested"; a packager who ran this module's test suite against
#: another Synapse may declare it tested. Not a config option, on purpose.
TESTED_RANGE_ENV = "SPS_TESTED_SYNAPSE_RANGE"


def _parse_version(raw: str) -> Version:
    """``"1.163.2"`` (also ``"1.164.0rc1"``, ``"2.0"``) as three integers."""
    parts = []
    for piece in raw.strip().split(".")[:3]:
        # Leading digits only: "0rc1" is 0.
        match = re.match(r"\d*", piece)
        parts.append(int(match.group(0) or 0) if match else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def synapse_version() -> Version:
    """The installed Synapse's version as a tuple of three integers."""
    return _parse_version(synapse.__version__)


def tested_synapse_range() -> tuple[Version, Version]:
    """The tested range: :data:`TESTED_SYNAPSE_RANGE`, unless :data:`TESTED_RANGE_ENV`
    says otherwise (a malformed value stops Synapse with a message)."""
    raw = os.environ.get(TESTED_RANGE_ENV, "").strip()
    if not raw:
        return TESTED_SYNAPSE_RANGE
    bounds = raw.split(",")
    if len(bounds) != 2 or not all(
        re.fullmatch(r"\s*\d+\.\d+\.\d+\s*", b) for b in bounds
    ):
        raise ConfigError(
            f"partial-state module: environment variable {TESTED_RANGE_ENV} is "
            f"{raw!r}; expected 'LOWEST,FIRST_EXCLUDED' Synapse versions, "
            "e.g. '1.163.0,1.164.0'"
        )
    return _parse_version(bounds[0]), _parse_version(bounds[1])


def _dotted(version: Version) -> str:
    return ".".join(map(str, version))


@attr.s(frozen=True, auto_attribs=True, slots=True)
class VersionGate:
    """What the version gate decided at start-up: whether the module installs its
    patches here, and why not. The log, the status endpoint and the admin API say it.
    """

    #: The installed Synapse, as it names itself.
    synapse_version: str
    #: The tested range, e.g. ``1.163.0 <= version < 1.164.0``.
    tested_range: str
    #: Whether the installed Synapse is inside it.
    tested: bool
    #: Whether the module installs its patches (and runs its engine) in this process.
    patches_active: bool
    #: Why the patches are off, or on although untested; None on a tested Synapse.
    #: Names no version: the status endpoint shows it to anyone.
    reason: str | None = None


#: The gate's verdicts on an untested Synapse (no version named: shown to anyone).
PATCHES_OFF = (
    "untested Synapse version: every patch is off and Synapse runs as stock "
    "(see the server log)"
)
PATCHES_ON_ANYWAY = (
    "untested Synapse version: patches installed anyway (allow_untested_synapse)"
)


def check_synapse_version(
    allow_untested: bool, refuse_untested: bool = False
) -> VersionGate:
    """Decide, from the installed Synapse's version, whether to install the patches.

    Inside the tested range: yes. Outside it the patches may break Synapse (they
    reach into internals that change between releases), but refusing to start
    would take the admin's whole server down at a Synapse upgrade; so by default the
    module installs nothing (Synapse runs as stock) and says so at ERROR level.
    ``allow_untested`` installs them anyway (a warning); ``refuse_untested`` stops
    Synapse (:class:`ConfigError`), for admins who prefer the hard stop. The config
    forbids setting both.
    """
    low, high = tested_synapse_range()
    found = synapse.__version__
    tested = f"{_dotted(low)} <= version < {_dotted(high)}"
    if low <= synapse_version() < high:
        return VersionGate(found, tested, tested=True, patches_active=True)
    if refuse_untested:
        raise ConfigError(
            f"partial-state module: Synapse {found} is outside the range this "
            f"module was tested with ({tested}). Its patches reach into Synapse "
            "internals that may have changed, and 'refuse_untested_synapse' is set, "
            "so Synapse does not start. Upgrade the module; or remove "
            "'refuse_untested_synapse' to start with the module's patches off "
            "(stock behaviour); or set 'allow_untested_synapse: true' to start "
            "with them on."
        )
    if allow_untested:
        logger.warning(
            "synapse_partial_state: Synapse %s is outside the tested range (%s); "
            "installing the patches anyway because allow_untested_synapse is set",
            found,
            tested,
        )
        return VersionGate(
            found, tested, tested=False, patches_active=True, reason=PATCHES_ON_ANYWAY
        )
    logger.error(
        "synapse_partial_state: Synapse %s is outside the range this module was "
        "tested with (%s). Its patches reach into Synapse internals that may have "
        "changed, so NONE is installed: Synapse runs as stock (its own resync and "
        "its own /send_join, /state and /state_ids answers), and the module only "
        "reports this (status endpoint, admin API). To use the module, upgrade "
        "synapse-partial-state to a release tested with Synapse %s, or set "
        "'allow_untested_synapse: true' in its config to install the patches "
        "anyway, at your own risk. To stop Synapse instead when this happens, set "
        "'refuse_untested_synapse: true'.",
        found,
        tested,
        found,
    )
    return VersionGate(
        found, tested, tested=False, patches_active=False, reason=PATCHES_OFF
    )


@attr.s(frozen=True, auto_attribs=True, slots=True)
class PatchRecord:
    """What one patch replaces, for the status endpoint and the start-up log."""

    target: str
    kind: str
    why: str
    checked: str = "1.163.2"


#: Patches installed in this process, in order.
INSTALLED_PATCHES: list[PatchRecord] = []


def record_patch(record: PatchRecord) -> None:
    if record not in INSTALLED_PATCHES:
        INSTALLED_PATCHES.append(record)


#: Private seams that only decide where the module's own endpoints answer (they
#: change nothing Synapse does), in order; listed apart from the patches.
INSTALLED_MOUNTS: list[PatchRecord] = []


def record_mount(record: PatchRecord) -> None:
    """Record a mount (see :mod:`.web`), in place of an earlier one of its target."""
    for index, old in enumerate(INSTALLED_MOUNTS):
        if old.target == record.target:
            INSTALLED_MOUNTS[index] = record
            return
    INSTALLED_MOUNTS.append(record)


def homeserver(api: ModuleApi) -> HomeServer:
    """The ``HomeServer`` behind the module API (private attribute ``_hs``)."""
    return api._hs


def main_store(api: ModuleApi) -> DataStore:
    """Synapse's main data store (private: reached through the homeserver)."""
    return homeserver(api).get_datastores().main


def wrap_instance_method(
    owner: Any,
    name: str,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    target: str,
    why: str,
    kind: str = "wrap (instance)",
) -> None:
    """Replace ``owner.name`` by ``wrap(native method)`` once, and record it.

    ``owner`` is an instance (``wrap`` gets the bound method) or a class (``wrap``
    gets the function, called with ``self`` first; ``kind="wrap"``)."""
    native = getattr(owner, name)
    if getattr(native, "_sps_wrapped", False):
        return
    wrapper = wrap(native)
    wrapper._sps_wrapped = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)
    record_patch(PatchRecord(target, kind, why))


def record_patch_replacing(record: PatchRecord) -> None:
    """Record ``record``, in place of an earlier record of the same target."""
    for index, old in enumerate(INSTALLED_PATCHES):
        if old.target == record.target:
            INSTALLED_PATCHES[index] = record
            return
    INSTALLED_PATCHES.append(record)
