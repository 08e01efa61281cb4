"""The version gate, the patch registry and the one way of installing a wrapper.

Every patch the package installs is recorded here (:data:`INSTALLED_PATCHES`) with
what it replaces and the Synapse version it was checked against; the status
endpoint and the start-up log line list them. The seams that only place the
module's own endpoints (:mod:`.web`) are recorded apart (:data:`INSTALLED_MOUNTS`).
"""

from __future__ import annotations

import logging
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

#: The Synapse releases this module was tested against: (lowest, first excluded).
TESTED_SYNAPSE_RANGE = ((1, 163, 0), (1, 164, 0))


def synapse_version() -> tuple[int, int, int]:
    """The installed Synapse's version as a tuple of three integers."""
    parts = []
    for piece in synapse.__version__.split(".")[:3]:
        # Leading digits only: "0rc1" is 0.
        match = re.match(r"\d*", piece)
        parts.append(int(match.group(0) or 0) if match else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def check_synapse_version(allow_untested: bool) -> None:
    """Refuse to start on a Synapse outside the tested range, unless told to."""
    low, high = TESTED_SYNAPSE_RANGE
    found = synapse_version()
    if low <= found < high:
        return
    tested = f"{'.'.join(map(str, low))} <= version < {'.'.join(map(str, high))}"
    if allow_untested:
        logger.warning(
            "synapse_partial_state: Synapse %s is outside the tested range (%s); "
            "starting anyway because allow_untested_synapse is set",
            synapse.__version__,
            tested,
        )
        return
    raise ConfigError(
        f"partial-state module: Synapse {synapse.__version__} is outside the range "
        f"this module was tested with ({tested}). Its patches reach into Synapse "
        "internals that may have changed. Upgrade the module, or set "
        "'allow_untested_synapse: true' in its config to start anyway."
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
) -> None:
    """Replace ``owner.name`` by ``wrap(native method)`` once, and record it."""
    native = getattr(owner, name)
    if getattr(native, "_sps_wrapped", False):
        return
    wrapper = wrap(native)
    wrapper._sps_wrapped = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)
    record_patch(PatchRecord(target, "wrap (instance)", why))


def record_patch_replacing(record: PatchRecord) -> None:
    """Record ``record``, in place of an earlier record of the same target."""
    for index, old in enumerate(INSTALLED_PATCHES):
        if old.target == record.target:
            INSTALLED_PATCHES[index] = record
            return
    INSTALLED_PATCHES.append(record)
