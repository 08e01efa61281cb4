"""``install_make_join_reads``: a ``/make_join`` reads only the current state it
uses (in-process; Synapse's handler and storage are faked). The black-box side
(the same templates as stock, a restricted room's authorising user) is in
``tests/blackbox/test_resident_send_join.py::JoinFailingAuth``."""

from __future__ import annotations

import unittest
from types import SimpleNamespace
from typing import Any

from synapse.federation import federation_server  # noqa: F401 (import order)
from synapse.handlers import federation
from synapse.types.state import StateFilter

from synapse_partial_state.compat import make_join, patching
from tests.unit.sync_run import run

FULL = {("m.room.join_rules", ""): "$jr", ("m.room.member", "@x:b"): "$x"}


class _Reads:
    """The state storage controller's ``get_current_state_ids``: records the
    filters asked for."""

    def __init__(self) -> None:
        self.filters: list[Any] = []

    async def get_current_state_ids(
        self, room_id: str, state_filter: Any = None, **kwargs: Any
    ) -> Any:
        self.filters.append((room_id, state_filter))
        return {"narrowed": True} if state_filter is not None else FULL


class _Auth:
    def __init__(self) -> None:
        self.restricted = False

    async def has_restricted_join_rules(self, state: Any, room_version: Any) -> bool:
        return self.restricted


class _Store:
    async def get_room_version(self, room_id: str) -> str:
        return "10"


class MakeJoinReadsTests(unittest.TestCase):
    def setUp(self) -> None:
        saved = (
            federation.FederationHandler.on_make_join_request,
            list(patching.INSTALLED_PATCHES),
        )

        def restore() -> None:
            federation.FederationHandler.on_make_join_request = saved[0]  # type: ignore[method-assign]
            patching.INSTALLED_PATCHES[:] = saved[1]

        self.addCleanup(restore)
        self.reads = _Reads()
        self.auth = _Auth()
        self.seen: list[Any] = []
        reads, seen = self.reads, self.seen

        async def native(handler: Any, origin: str, room_id: str, user: str) -> Any:
            """As Synapse: one unfiltered read of the room's current state."""
            seen.append(await reads.get_current_state_ids(room_id))
            return "template"

        federation.FederationHandler.on_make_join_request = native  # type: ignore[method-assign,assignment]
        hs = SimpleNamespace(
            get_event_auth_handler=lambda: self.auth,
            get_datastores=lambda: SimpleNamespace(main=_Store()),
            get_storage_controllers=lambda: SimpleNamespace(state=self.reads),
        )
        make_join.install_make_join_reads(SimpleNamespace(_hs=hs))  # type: ignore[arg-type]
        self.handler = federation.FederationHandler.__new__(
            federation.FederationHandler
        )

    def make_join(self, room_id: str = "!r:a", user: str = "@j:b") -> Any:
        return run(self.handler.on_make_join_request("b", room_id, user))

    def test_make_join_reads_the_non_members_and_the_joiner(self) -> None:
        self.assertEqual(self.make_join(), "template")
        self.assertEqual(self.seen, [{"narrowed": True}])
        ((room_id, state_filter),) = self.reads.filters
        self.assertEqual(room_id, "!r:a")
        self.assertEqual(
            state_filter,
            StateFilter.freeze({"m.room.member": {"@j:b"}}, include_others=True),
        )

    def test_restricted_rooms_read_the_whole_state(self) -> None:
        """Synapse then looks for a local member who could invite."""
        self.auth.restricted = True
        self.make_join()
        self.assertEqual(self.seen, [FULL])
        self.assertEqual([f is None for _, f in self.reads.filters], [False, True])

    def test_other_reads_pass_through(self) -> None:
        """Outside a make_join, filtered, or of another room: Synapse's read."""
        reads = self.reads.get_current_state_ids
        self.assertEqual(run(reads("!r:a")), FULL)
        only = StateFilter.from_types([("m.room.create", "")])
        self.assertEqual(run(reads("!r:a", only)), {"narrowed": True})
        self.assertEqual(self.reads.filters, [("!r:a", None), ("!r:a", only)])

        async def other_room(handler: Any, origin: str, room_id: str, user: str) -> Any:
            return await reads("!other:a")

        token = make_join._MAKE_JOIN.set(("!r:a", "@j:b"))
        try:
            self.assertEqual(run(other_room(None, "b", "!r:a", "@j:b")), FULL)
        finally:
            make_join._MAKE_JOIN.reset(token)

    def test_recorded(self) -> None:
        targets = {p.target: p.why for p in patching.INSTALLED_PATCHES}
        self.assertIn(
            "synapse.handlers.federation.FederationHandler.on_make_join_request",
            targets,
        )
        why = targets[
            "synapse.storage.controllers.state.StateStorageController"
            ".get_current_state_ids"
        ]
        self.assertIn("restricted", why)
