"""synapse-partial-state: fast partial-state room joins for Synapse.

Enable it in ``homeserver.yaml``::

    modules:
      - module: synapse_partial_state.PartialStateModule
        config: {}

The package itself imports nothing heavy: the module class (and with it Synapse)
is loaded on first use, so that the signature-checking worker processes, which
import ``synapse_partial_state.joining.verify``, stay small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["PartialStateModule", "PartialStateConfig", "__version__"]

if TYPE_CHECKING:
    from synapse_partial_state.config import PartialStateConfig
    from synapse_partial_state.module import PartialStateModule


def __getattr__(name: str) -> Any:
    if name == "PartialStateModule":
        from synapse_partial_state.module import PartialStateModule

        return PartialStateModule
    if name == "PartialStateConfig":
        from synapse_partial_state.config import PartialStateConfig

        return PartialStateConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
