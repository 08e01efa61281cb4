"""The bulk finish's pure parts: which delta entries it writes in bulk, when it
takes the bulk path, and that the gate keeps it off on untested Synapse. (Its
rows are compared with Synapse's in tests/blackbox/test_bulk_finish.py.)"""

from __future__ import annotations

from typing import Any
from unittest import mock

from synapse.storage.databases.main.events import DeltaState
from twisted.trial import unittest

from synapse_partial_state.compat import patching
from synapse_partial_state.compat.bulk import finish, gate

MEMBER = "m.room.member"


def is_mine(user_id: str) -> bool:
    return user_id.endswith(":here")


def remote_members(n: int) -> dict[tuple[str, str], str]:
    return {(MEMBER, f"@u{i}:there"): f"$m{i}" for i in range(n)}


class EventsStore:
    """Stands for Synapse's PersistEventsStore: records calls of the txn."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def _update_current_state_txn(self, *args: Any) -> None:
        self.calls.append(args)


def fake_hs(events_store: EventsStore | None) -> mock.Mock:
    hs = mock.Mock()
    hs.get_storage_controllers.return_value.persistence = (
        None if events_store is None else mock.Mock(persist_events_store=events_store)
    )
    hs.is_mine_id = is_mine
    return hs


class SplitTests(unittest.TestCase):
    def test_remote_members_are_the_bulk(self) -> None:
        to_insert = {
            (MEMBER, "@a:there"): "$a",
            (MEMBER, "@b:here"): "$b",
            ("m.room.name", ""): "$n",
            ("m.room.third_party_invite", "tok"): "$t",
        }
        members, rest = finish.split_delta(to_insert, is_mine)
        self.assertEqual(members, {"@a:there": "$a"})
        self.assertEqual(
            rest,
            {
                (MEMBER, "@b:here"): "$b",
                ("m.room.name", ""): "$n",
                ("m.room.third_party_invite", "tok"): "$t",
            },
        )

    def test_chunks(self) -> None:
        self.assertEqual(list(finish.chunks(range(5), 2)), [[0, 1], [2, 3], [4]])
        self.assertEqual(list(finish.chunks([], 2)), [])


class DispatchTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = EventsStore()
        self.bulk = finish.BulkFinish(fake_hs(self.store))
        self.write = mock.Mock(return_value=0)
        self.after = mock.Mock()
        self.bulk.write_members_txn = self.write  # type: ignore[method-assign]
        self.bulk.after_members_txn = self.after  # type: ignore[method-assign]
        self.txn = self.bulk._wrap(self.store._update_current_state_txn)

    def test_small_delta_goes_to_synapse_as_is(self) -> None:
        delta = DeltaState([], remote_members(finish.BULK_MIN_MEMBERS - 1))
        self.txn("txn", "!r", delta, 7, "ss")
        self.assertEqual(self.store.calls, [("txn", "!r", delta, 7, "ss")])
        self.write.assert_not_called()

    def test_leaving_the_room_goes_to_synapse(self) -> None:
        delta = DeltaState([], remote_members(500), no_longer_in_room=True)
        self.txn("txn", "!r", delta, 7, "ss")
        self.assertEqual(self.store.calls, [("txn", "!r", delta, 7, "ss")])
        self.write.assert_not_called()

    def test_whole_room_members_in_bulk_the_rest_to_synapse(self) -> None:
        to_insert = remote_members(finish.BULK_MIN_MEMBERS)
        to_insert[(MEMBER, "@me:here")] = "$me"
        to_insert[("m.room.name", "")] = "$n"
        delta = DeltaState([("m.room.topic", "")], to_insert)
        self.txn("txn", "!r", delta, 7, "ss")
        members = {k[1]: v for k, v in remote_members(finish.BULK_MIN_MEMBERS).items()}
        self.write.assert_called_once_with("txn", "!r", members, 7)
        ((txn, room, rest, stream, ss),) = self.store.calls
        self.assertEqual((txn, room, stream, ss), ("txn", "!r", 7, "ss"))
        self.assertEqual(rest.to_delete, [("m.room.topic", "")])
        self.assertEqual(
            rest.to_insert, {(MEMBER, "@me:here"): "$me", ("m.room.name", ""): "$n"}
        )
        self.assertFalse(rest.no_longer_in_room)
        self.after.assert_called_once_with("txn", "!r", list(members), 7)
        self.assertEqual(self.bulk.bulk_runs, 1)


class InstallTests(unittest.TestCase):
    def setUp(self) -> None:
        saved = list(patching.INSTALLED_PATCHES)

        def restore() -> None:
            patching.INSTALLED_PATCHES[:] = saved

        self.addCleanup(restore)

    def install(self, version: patching.Version, enabled: bool = True) -> EventsStore:
        store = EventsStore()
        api = mock.Mock()
        with (
            mock.patch.object(finish, "homeserver", return_value=fake_hs(store)),
            mock.patch.object(gate, "synapse_version", return_value=version),
        ):
            finish.install_bulk_finish(
                api, gate.configured(gate.release_verdict(), enabled)
            )
        return store

    def wrapped(self, store: EventsStore) -> bool:
        return getattr(store._update_current_state_txn, "_sps_wrapped", False)

    def test_tested_synapse_gets_the_bulk_finish(self) -> None:
        self.assertTrue(self.wrapped(self.install((1, 163, 2))))

    def test_untested_synapse_keeps_synapse_finish(self) -> None:
        with self.assertLogs(gate.logger, "WARNING"):
            store = self.install((1, 164, 0))
        self.assertFalse(self.wrapped(store))

    def test_off_by_configuration(self) -> None:
        self.assertFalse(self.wrapped(self.install((1, 163, 2), enabled=False)))

    def test_not_where_events_are_not_persisted(self) -> None:
        with mock.patch.object(finish, "homeserver", return_value=fake_hs(None)):
            self.assertIsNone(
                finish.install_bulk_finish(mock.Mock(), gate.BulkGate(True))
            )
