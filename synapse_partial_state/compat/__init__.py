"""The compat layer: every private Synapse access and every patch, a file per seam.

The rest of the package imports only public Synapse names (``synapse.module_api``,
``synapse.api.constants``, ``synapse.types``), Synapse's classes for type hints
only (under ``TYPE_CHECKING``), and the typed helpers here; SQL outside this layer
touches only the module's own tables (``joining/store.py``). A deliberate exception
says why in one line where it stands (``joining/verify.py``: its worker processes
import Synapse's event classes, so that the bytes checked are Synapse's).

* :mod:`.patching`: the version gate, the patch registry, installing a wrapper
* :mod:`.runtime`: waking waiters under Synapse's log-context rules, its async helpers
* :mod:`.errors`: Synapse's exception classes, asked about
* :mod:`.resync`: the resync hook and the native resync operations
* :mod:`.state_fetch`: the native operations of the engine's own state fetch
* :mod:`.persistence`: the current-state guard
* :mod:`.state_resolution`: identical state sets resolve to themselves
* :mod:`.servlets`: request-aware federation servlets, ``/state`` servlets, writing
* :mod:`.send_join`: the ``/send_join`` wrapper and the room facts it reads
* :mod:`.resident_state`: what the ``/state`` server reads, event-cache invalidation
* :mod:`.web`: the admin API inside Synapse's admin resource, the module's client
  API inside Synapse's client resource, the listeners that serve the client API
* :mod:`.sync`: the syncing signal in ``/sync`` and sliding sync
* :mod:`.clients`: what the client endpoint reads (partial-state flag, membership,
  member summary)

Checked against: matrix-synapse 1.163.2 (source read in the installed wheel).
"""
