"""The progress endpoint's answers, with Synapse faked (no Synapse process)."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, cast

from synapse.module_api import ModuleApi
from synapse.module_api.errors import SynapseError
from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.clients.endpoint import (
    NOT_IN_ROOM,
    PARTIAL_STATE_PATH,
    PartialStateEndpoint,
    syncing_answer,
)
from synapse_partial_state.compat.clients import MemberSummary
from synapse_partial_state.compat.web import CLIENT_API_PREFIX
from synapse_partial_state.joining.jobs import Job, Phase

NOW = 100_000
SUMMARY = MemberSummary(("@a:x", "@b:x"), joined_member_count=3, invited_member_count=1)


def job(**changes: Any) -> Job:
    fields: dict[str, Any] = {
        "room_id": "!r:x",
        "phase": Phase.FETCHING,
        "created_ts": 0,
        "updated_ts": 0,
        "started_ts": NOW - 10_000,
        "events_persisted": 400,
        "events_applied": 0,
        "events_remaining": 600,
        "attempts": 1,
    }
    fields.update(changes)
    return Job(**fields)


class Facts:
    def __init__(self, joined: set[tuple[str, str]], partial: set[str]) -> None:
        self.joined, self.partial = joined, partial
        self.summaries: list[tuple[str, str]] = []

    async def is_joined(self, user_id: str, room_id: str) -> bool:
        return (user_id, room_id) in self.joined

    async def is_partial_state(self, room_id: str) -> bool:
        return room_id in self.partial

    async def member_summary(self, room_id: str, user_id: str) -> MemberSummary:
        self.summaries.append((room_id, user_id))
        return SUMMARY

    def now_ms(self) -> int:
        return NOW


class Jobs:
    def __init__(self, jobs: dict[str, Job]) -> None:
        self.jobs = jobs

    async def get(self, room_id: str) -> Job | None:
        return self.jobs.get(room_id)


def api_for(user_id: str) -> ModuleApi:
    async def get_user_by_req(request: Any) -> Any:
        return SimpleNamespace(user=SimpleNamespace(to_string=lambda: user_id))

    return cast(ModuleApi, SimpleNamespace(get_user_by_req=get_user_by_req))


class SyncingAnswerTests(unittest.TestCase):
    def test_progress_eta_and_summary(self) -> None:
        self.assertEqual(
            syncing_answer(job(), NOW, SUMMARY),
            {
                "syncing": True,
                "progress": {
                    "phase": "fetching",
                    "events_persisted": 400,
                    "events_applied": 0,
                    "events_remaining": 600,
                    "attempts": 1,
                },
                # 400 events in 10 s: 600 more take 15 s
                "eta_seconds": 15,
                "summary": {
                    "m.heroes": ["@a:x", "@b:x"],
                    "m.joined_member_count": 3,
                    "m.invited_member_count": 1,
                },
            },
        )

    def test_eta_rounds_up_to_whole_seconds(self) -> None:
        answer = syncing_answer(job(events_remaining=601), NOW, SUMMARY)
        self.assertEqual(answer["eta_seconds"], 16)

    def test_no_eta_before_anything_is_stored(self) -> None:
        answer = syncing_answer(
            job(events_persisted=0, events_remaining=None), NOW, SUMMARY
        )
        self.assertIsNone(answer["eta_seconds"])
        self.assertIsNone(answer["progress"]["events_remaining"])

    def test_no_job_row(self) -> None:
        """e.g. Synapse's own resync (resync.enabled: false), or the moment
        before the engine writes the row."""
        answer = syncing_answer(None, NOW, SUMMARY)
        self.assertEqual(answer["progress"], None)
        self.assertEqual(answer["eta_seconds"], None)
        self.assertTrue(answer["syncing"])

    def test_a_finished_job_is_an_earlier_joins(self) -> None:
        for phase in (Phase.DONE, Phase.ABORTED):
            answer = syncing_answer(job(phase=phase), NOW, SUMMARY)
            self.assertIsNone(answer["progress"])
            self.assertIsNone(answer["eta_seconds"])


class EndpointTests(unittest.TestCase):
    def endpoint(self, user_id: str = "@bob:x") -> PartialStateEndpoint:
        self.facts = Facts(
            joined={("@bob:x", "!r:x"), ("@bob:x", "!done:x")}, partial={"!r:x"}
        )
        return PartialStateEndpoint(
            api_for(user_id), self.facts, Jobs({"!r:x": job(), "!done:x": job()})
        )

    def get(self, endpoint: PartialStateEndpoint, room_id: str) -> Any:
        return defer.ensureDeferred(endpoint.on_GET(cast(Any, object()), room_id))

    def test_a_member_of_a_partial_room(self) -> None:
        status, body = self.successResultOf(self.get(self.endpoint(), "!r:x"))
        self.assertEqual(status, 200)
        self.assertEqual(body, syncing_answer(job(), NOW, SUMMARY))
        # the heroes are computed for the requesting user
        self.assertEqual(self.facts.summaries, [("!r:x", "@bob:x")])

    def test_a_member_of_a_complete_room(self) -> None:
        result = self.successResultOf(self.get(self.endpoint(), "!done:x"))
        self.assertEqual(result, (200, {"syncing": False}))

    def test_not_a_member_and_unknown_room_get_the_same_403(self) -> None:
        errors = []
        for user_id, room_id in (
            ("@carol:x", "!r:x"),
            ("@carol:x", "!unknown:x"),
            ("@bob:x", "!unknown:x"),
        ):
            failure = self.failureResultOf(
                self.get(self.endpoint(user_id), room_id), SynapseError
            )
            error = failure.value
            errors.append((error.code, error.errcode, error.msg))
        self.assertEqual(errors, [(403, "M_FORBIDDEN", NOT_IN_ROOM)] * 3)
        self.assertEqual(self.facts.summaries, [])

    def test_route(self) -> None:
        (route,) = self.endpoint().routes()
        self.assertEqual(route.method, "GET")
        pattern = re.compile("^" + CLIENT_API_PREFIX + route.path)
        path = PARTIAL_STATE_PATH.format(room_id="%21r%3Ax")
        self.assertEqual(
            path,
            "/_matrix/client/unstable/org.matrix.msc2775/rooms/%21r%3Ax/partial_state",
        )
        match = pattern.match(path)
        self.assertEqual(match and match.groupdict(), {"room_id": "%21r%3Ax"})
        for other in (
            path + "/x",
            path.replace("msc2775", "msc2775x"),
            path.replace("org.matrix", "orgXmatrix"),
        ):
            self.assertIsNone(pattern.match(other), other)
