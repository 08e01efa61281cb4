"""Pure unit tests of the benchmark's report functions and log parsers.

No homeserver is started: these run on sample records and sample Synapse log lines.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
import unittest
from typing import Any

_SCRIPTS_DEV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "scripts-dev",
)
if _SCRIPTS_DEV not in sys.path:
    sys.path.insert(0, _SCRIPTS_DEV)

from bench import cli, measure, report  # noqa: E402
from bench.progress import Progress  # noqa: E402

ROOM = "!2yf6dFLBI_jCENCB:127.0.0.1:38587"
ROOM_Q = "%212yf6dFLBI_jCENCB%3A127.0.0.1%3A38587"


def _ts(epoch: float) -> str:
    """A Synapse log timestamp for ``epoch`` (local time, milliseconds)."""
    base = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    return f"{base},{int(round(epoch % 1 * 1000)) % 1000:03d}"


T0 = 1_800_000_000.0  # a whole second, so timestamps round-trip exactly


def line(offset: float, rest: str) -> str:
    return f"{_ts(T0 + offset)} - {rest}"


ACCESS_STATE = line(
    1.5,
    "synapse.access.https.24257 - 643 - INFO - GET-12 - 127.0.0.1 - 24257 -"
    " {127.0.0.1:31659} Processed request: 0.029sec/0.033sec ru=(0.026sec, 0.009sec)"
    " db=(0.001sec/0.011sec/2) 698179B 200"
    f' "GET /_matrix/federation/v1/state/{ROOM_Q}?event_id=%24gzup HTTP/1.1"'
    ' "Synapse/1.163.2 (b=main,7c64f63)" [0 dbevts]',
)
ACCESS_SEND_JOIN = line(
    1.0,
    "synapse.access.https.24257 - 643 - INFO - PUT-8 - 127.0.0.1 - 24257 -"
    " {127.0.0.1:31659} Processed request: 0.338sec/0.003sec ru=(0.005sec, 0.001sec)"
    " db=(0.077sec/0.010sec/19) 7695B 200"
    f' "PUT /_matrix/federation/v2/send_join/{ROOM_Q}/%24ySBv?omit_members=true'
    ' HTTP/1.1" "Synapse/1.163.2" [0 dbevts]',
)
ACCESS_CLIENT = line(
    0.5,
    "synapse.access.http.22419 - 643 - INFO - POST-3 - 127.0.0.1 - 22419 -"
    " {@alice:127.0.0.1:24257} Processed request: 0.165sec/0.001sec"
    " ru=(0.021sec, 0.001sec) db=(0.014sec/0.033sec/36) 47B 200"
    f' "POST /_matrix/client/v3/join/{ROOM_Q} HTTP/1.1" "python-requests/2.34.2"'
    " [0 dbevts]",
)
OUT_STATE_IDS = line(
    2.0,
    "synapse.http.matrixfederationclient - 371 - INFO - sync_partial_state_room-0 -"
    " {GET-O-6} [127.0.0.1:24257] Completed request: 200 OK in 0.06 secs, got 48442"
    " bytes - GET matrix-federation://127.0.0.1:24257/_matrix/federation/v1/state_ids/"
    f"{ROOM_Q}?event_id=%24gzup",
)
OUT_STATE = line(
    3.25,
    "synapse.http.matrixfederationclient - 371 - INFO - sync_partial_state_room-0 -"
    " {GET-O-11} [127.0.0.1:24257] Completed request: 200 OK in 0.36 secs, got 698179"
    " bytes - GET matrix-federation://127.0.0.1:24257/_matrix/federation/v1/state/"
    f"{ROOM_Q}?event_id=%24gzup",
)
OUT_KEY = line(
    0.7,
    "synapse.http.matrixfederationclient - 371 - INFO - ServerKeyFetcher-0 -"
    " {GET-O-3} [127.0.0.1:24257] Completed request: 200 OK in 0.01 secs, got 313"
    " bytes - GET matrix-federation://127.0.0.1:24257/_matrix/key/v2/server",
)
OUT_KEY_LATE = OUT_KEY.replace(_ts(T0 + 0.7), _ts(T0 + 4.0))
SYNCING = line(
    1.25,
    "synapse.handlers.federation - 2499 - INFO - sync_partial_state_room-0 -"
    f" Syncing state for room {ROOM} via 127.0.0.1:24257",
)
COMPLETE = line(
    9.5,
    "synapse.handlers.federation - 2525 - INFO - sync_partial_state_room-0 -"
    f" State resync complete for {ROOM}",
)


def run(
    variant: str,
    metrics: dict[str, Any],
    members: int = 1000,
    scenario: str = "join",
    db: str = "sqlite",
    n: int = 0,
) -> dict[str, Any]:
    return {
        "variant": variant,
        "scenario": scenario,
        "db": db,
        "members": members,
        "servers": 50,
        "run": n,
        "metrics": metrics,
    }


RUNS = [
    run(
        "stock", {"join_s": 1.0, "full_members_s": 20.0, "stage:resync complete": 19.0}
    ),
    run(
        "stock", {"join_s": 3.0, "full_members_s": 22.0, "stage:resync complete": 21.0}
    ),
    run("stock", {"join_s": 2.0, "full_members_s": 30.0, "bytes:state": 5.0}),
    run(
        "module", {"join_s": 0.5, "full_members_s": 10.0, "stage:resync complete": 9.0}
    ),
    run("module", {"join_s": 1.5, "full_members_s": 12.0, "bytes:state": 5.0}),
    run("module", {"join_s": 1.0, "full_members_s": 11.0}),
    run("stock", {"send_join_s": 0.4}, scenario="resident"),
    run("module", {"send_join_s": 0.2}, scenario="resident"),
    run("stock", {"join_s": 8.0}, members=10000),
]


class MediansAndRatios(unittest.TestCase):
    def test_medians_per_room_and_variant(self) -> None:
        med = report.group_medians(RUNS)
        key = ("join", "sqlite", 1000, 50)
        self.assertEqual(med[key]["stock"]["join_s"], 2.0)
        self.assertEqual(med[key]["module"]["join_s"], 1.0)
        self.assertEqual(med[key]["stock"]["full_members_s"], 22.0)
        self.assertEqual(med[key]["stock"]["stage:resync complete"], 20.0)
        self.assertEqual(
            med[("resident", "sqlite", 1000, 50)]["module"]["send_join_s"], 0.2
        )
        self.assertEqual(med[("join", "sqlite", 10000, 50)], {"stock": {"join_s": 8.0}})

    def test_non_numbers_are_ignored(self) -> None:
        med = report.group_medians(
            [
                run(
                    "stock",
                    {"join_s": 1.0, "note": "x", "ok": True, "bad": float("nan")},
                )
            ]
        )
        self.assertEqual(med[("join", "sqlite", 1000, 50)]["stock"], {"join_s": 1.0})

    def test_ratio(self) -> None:
        self.assertEqual(report.ratio(1.0, 4.0), 0.25)
        self.assertIsNone(report.ratio(None, 4.0))
        self.assertIsNone(report.ratio(1.0, None))
        self.assertIsNone(report.ratio(1.0, 0.0))

    def test_metric_info(self) -> None:
        self.assertEqual(report.metric_info("join_s"), ("/join returns", "s", True))
        label, unit, _ = report.metric_info("bytes:state_ids") or ("", "", True)
        self.assertEqual((label, unit), ("bytes from state_ids", "MiB"))
        self.assertIsNone(report.metric_info("whatever"))
        self.assertIsNone(report.metric_info("nope:x"))


class Table(unittest.TestCase):
    def test_main_table(self) -> None:
        text = report.format_table(RUNS)
        lines = text.splitlines()
        self.assertIn("module/stock", lines[0])
        join = next(row for row in lines if "/join returns" in row and "1,000" in row)
        self.assertIn("2.00", join)
        self.assertIn("1.00", join)
        self.assertIn("0.50x", join)
        self.assertRegex(join, r"\b3\b")  # three runs behind each median
        full = next(row for row in lines if "full member list" in row)
        self.assertIn("0.50x", full)  # 11 / 22
        resident = next(row for row in lines if "resident send_join" in row)
        self.assertIn("0.50x", resident)
        only_stock = next(row for row in lines if "10,000" in row)
        self.assertTrue(only_stock.rstrip().endswith("-"))
        # Breakdown metrics stay out of the main table.
        self.assertNotIn("stage:", text)
        self.assertNotIn("resync complete", text)
        # Main metrics keep METRICS' order.
        self.assertLess(text.index("/join returns"), text.index("full member list"))

    def test_breakdown_table(self) -> None:
        text = report.format_table(RUNS, breakdowns=True)
        self.assertIn("stage: resync complete (s after /join)", text)
        self.assertIn("bytes from state (MiB)", text)
        self.assertNotIn("/join returns", text)
        row = next(r for r in text.splitlines() if "resync complete" in r)
        self.assertIn("20.00", row)
        self.assertIn("9.00", row)
        self.assertIn("0.45x", row)

    def test_stages_sorted_by_time(self) -> None:
        runs = [
            run("stock", {"stage:b": 5.0, "stage:a": 7.0, "stage:c": 1.0}),
            run("module", {"stage:z": 0.5}),
        ]
        text = report.format_table(runs, breakdowns=True)
        order = [text.index(f"stage: {s} ") for s in ("c", "b", "a")]
        self.assertEqual(order, sorted(order))
        self.assertLess(text.index("stage: z "), text.index("stage: c "))

    def test_stage_durations_and_cores_follow_their_stage_in_time(self) -> None:
        runs = [
            run(
                "stock",
                {
                    "stage:late": 9.0,
                    "stage:early": 2.0,
                    "took:late": 7.0,
                    "took:early": 2.0,
                    "cores:late": 0.95,
                    "dbcores:late": 0.4,
                },
            )
        ]
        text = report.format_table(runs, breakdowns=True)
        self.assertIn("stage took: late (s since the stage before)", text)
        self.assertIn("joiner CPU during: late (cores)", text)
        self.assertIn("its PostgreSQL during: late (cores)", text)
        self.assertLess(text.index("stage took: early"), text.index("stage took: late"))

    def test_report_has_machine_notes_and_errors(self) -> None:
        failed = dict(run("module", {}), error="TimeoutError: too slow")
        text = report.format_report("2 cores", [*RUNS, failed], notes=["hello"])
        self.assertIn("Machine: 2 cores", text)
        self.assertIn("Note: hello", text)
        self.assertIn("Breakdown", text)
        self.assertIn("Failed runs:", text)
        self.assertIn("TimeoutError: too slow", text)

    def test_empty(self) -> None:
        text = report.format_report("m", [dict(run("stock", {}), error="boom")])
        self.assertIn("no successful measurement", text)
        self.assertIn("boom", text)


class Files(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-report-test-")
        self.addCleanup(__import__("shutil").rmtree, self.dir, True)

    def test_json_round_trip(self) -> None:
        path = os.path.join(self.dir, "sub", "results.json")
        machine = {"cores_logical": 2, "synapse": "1.163.2"}
        report.write_json(path, machine, RUNS, parameters={"runs": 3})
        data = report.read_json(path)
        self.assertEqual(data["machine"], machine)
        self.assertEqual(data["runs"], RUNS)
        self.assertEqual(data["parameters"], {"runs": 3})
        self.assertEqual(report.group_medians(data["runs"]), report.group_medians(RUNS))
        self.assertFalse(os.path.exists(path + ".tmp"))
        with open(os.path.join(self.dir, "other.json"), "w") as f:
            json.dump([1, 2], f)
        with self.assertRaises(ValueError):
            report.read_json(os.path.join(self.dir, "other.json"))

    def test_plot_writes_a_png(self) -> None:
        path = os.path.join(self.dir, "plot.png")
        plotted = report.plot(path, RUNS, "test")
        self.assertEqual(plotted, ["join_s", "full_members_s", "send_join_s"])
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertEqual(report.plot(os.path.join(self.dir, "none.png"), [], "x"), [])

    def test_headline_plot_is_the_member_list_per_variant_and_database(self) -> None:
        from unittest import mock

        import matplotlib.axes

        path = os.path.join(self.dir, "headline.png")
        with mock.patch.object(
            matplotlib.axes.Axes, "plot", autospec=True, wraps=matplotlib.axes.Axes.plot
        ) as drawn:
            self.assertTrue(report.plot_headline(path, RUNS, "test"))
        lines = {
            c.kwargs["label"]: (c.args[1], c.args[2]) for c in drawn.call_args_list
        }
        # Medians of the join scenario's full member list, by room size.
        self.assertEqual(lines["stock, SQLite"], ([1000], [22.0]))
        self.assertEqual(lines["module, SQLite"], ([1000], [11.0]))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertFalse(report.plot_headline(os.path.join(self.dir, "n.png"), [], "x"))


class LogParsers(unittest.TestCase):
    def test_log_time(self) -> None:
        self.assertEqual(measure.parse_log_time(SYNCING), T0 + 1.25)
        self.assertIsNone(measure.parse_log_time("no time here"))

    def test_endpoint_names(self) -> None:
        e = measure.endpoint_of
        self.assertEqual(
            e(f"/_matrix/federation/v1/state_ids/{ROOM_Q}?event_id=x"), "state_ids"
        )
        self.assertEqual(e("/_matrix/federation/v2/send_join/r/e"), "send_join")
        self.assertEqual(e("/_matrix/federation/v1/query/profile"), "query/profile")
        self.assertEqual(e("/_matrix/federation/v1/user/devices/@u:x"), "user/devices")
        self.assertEqual(e("/_matrix/federation/unstable/foo/bar"), "foo")
        self.assertEqual(e("/_matrix/key/v2/server"), "key/server")
        self.assertEqual(e("/_matrix/key/v2/query"), "key/query")
        self.assertEqual(e("/_matrix/client/v3/sync"), "_matrix/client/v3")

    def test_access_line(self) -> None:
        r = measure.parse_access_line(ACCESS_STATE)
        assert r is not None
        self.assertEqual(r.peer, "127.0.0.1:31659")
        self.assertEqual(r.endpoint, "state")
        self.assertEqual(r.method, "GET")
        self.assertEqual(r.path, f"/_matrix/federation/v1/state/{ROOM}")
        self.assertEqual((r.status, r.bytes), (200, 698179))
        self.assertAlmostEqual(r.seconds, 0.062)
        self.assertEqual(r.time, T0 + 1.5)
        self.assertIsNone(measure.parse_access_line(OUT_STATE))

    def test_access_line_with_negative_send_time(self) -> None:
        text = ACCESS_STATE.replace("0.029sec/0.033sec", "0.052sec/-0.000sec")
        r = measure.parse_access_line(text)
        assert r is not None
        self.assertEqual(r.seconds, 0.052)

    def test_access_requests_filter_by_origin_and_time(self) -> None:
        lines = [ACCESS_CLIENT, ACCESS_SEND_JOIN, ACCESS_STATE, "garbage"]
        got = measure.access_requests(lines, origin="127.0.0.1:31659")
        self.assertEqual([r.endpoint for r in got], ["send_join", "state"])
        got = measure.access_requests(lines, since=T0 + 1.2)
        self.assertEqual([r.endpoint for r in got], ["state"])
        agg = measure.aggregate(measure.access_requests(lines))
        self.assertEqual(agg["send_join"]["bytes"], 7695)
        self.assertEqual(agg["state"]["count"], 1)
        self.assertIn("_matrix/client/v3", agg)

    def test_outgoing_lines(self) -> None:
        r = measure.parse_outgoing_line(OUT_STATE)
        assert r is not None
        self.assertEqual(
            (r.peer, r.endpoint, r.bytes, r.seconds),
            ("127.0.0.1:24257", "state", 698179, 0.36),
        )
        self.assertIsNone(measure.parse_outgoing_line(ACCESS_STATE))
        lines = [OUT_KEY, OUT_STATE_IDS, OUT_STATE, OUT_KEY_LATE, SYNCING]
        agg = measure.aggregate(
            measure.outgoing_requests(lines, since=T0 + 1, until=T0 + 3.5)
        )
        self.assertEqual(set(agg), {"state_ids", "state"})
        agg = measure.aggregate(measure.outgoing_requests(lines))
        self.assertEqual(agg["key/server"]["count"], 2)
        self.assertEqual(agg["key/server"]["bytes"], 626)

    def test_fake_peer_requests(self) -> None:
        entries = [
            {
                "time": T0 + 1,
                "method": "PUT",
                "path": "/_matrix/federation/v2/send_join/r/e",
                "origin": "hs2",
                "status": 200,
                "bytes": 5000,
                "ms": 250,
            },
            {
                "time": T0 + 2,
                "method": "GET",
                "path": "/_matrix/key/v2/server",
                "origin": None,
                "status": 200,
                "bytes": 300,
                "ms": 2,
            },
            {
                "time": T0 + 3,
                "method": "GET",
                "path": "/_matrix/federation/v1/state/r",
                "origin": "other",
                "status": 200,
                "bytes": 9,
                "ms": 1,
            },
            {
                "time": T0 - 5,
                "method": "GET",
                "path": "/_matrix/federation/v1/state/r",
                "origin": "hs2",
                "status": 200,
                "bytes": 9,
                "ms": 1,
            },
        ]
        agg = measure.aggregate_peer_requests(entries, origin="hs2", since=T0)
        self.assertEqual(set(agg), {"send_join", "key/server"})
        self.assertEqual(agg["send_join"]["seconds"], 0.25)
        self.assertEqual(agg["key/server"]["bytes"], 300)

    def test_stages(self) -> None:
        module_line = line(
            5.0,
            "synapse_partial_state.joining.engine - 90 - INFO - resync-0 -"
            f" Resync of {ROOM}: stage=fetch_state done",
        )
        engine_done = line(
            6.0,
            "synapse_partial_state.joining.engine - 400 - INFO - resync-0 -"
            f" Resync of {ROOM} complete in 4.4 s (2 events, 0 failed round(s))",
        )
        lines = [
            OUT_KEY,
            SYNCING,
            OUT_STATE_IDS,
            OUT_STATE,
            OUT_KEY_LATE,
            module_line,
            engine_done,
            COMPLETE,
            "no time",
        ]
        stages = measure.stage_times(lines, T0, ROOM)
        self.assertEqual(stages["resync started"], 1.25)
        self.assertEqual(stages["state_ids received"], 2.0)
        self.assertEqual(stages["state received"], 3.25)
        self.assertEqual(stages["last key fetched"], 4.0)  # the last one counts
        self.assertEqual(stages["module:fetch_state"], 5.0)
        self.assertEqual(stages["resync complete"], 6.0)  # first of stock|module lines
        self.assertEqual(list(stages), sorted(stages, key=stages.__getitem__))
        # Other rooms' lines do not count; lines after `until` neither.
        self.assertEqual(
            measure.stage_times(lines, T0, "!other:x"), {"last key fetched": 4.0}
        )
        self.assertNotIn(
            "resync complete", measure.stage_times(lines, T0, ROOM, until=T0 + 5.5)
        )

    def test_a_notary_query_is_a_key_fetch(self) -> None:
        query = line(
            4.5,
            "synapse.http.matrixfederationclient - 371 - INFO - PerspectivesKeyFetcher-0"
            " - {POST-O-9} [127.0.0.1:24999] Completed request: 200 OK in 0.05 secs,"
            " got 9000 bytes - POST matrix-federation://127.0.0.1:24999"
            "/_matrix/key/v2/query",
        )
        prefetched = line(
            4.75,
            "synapse_partial_state.joining.keys - 160 - INFO - sps_prefetch_keys-0 -"
            f" Resync of {ROOM}: prefetched signing keys of 199 server(s) in 3.50 s"
            " (199 from notaries in 1 request(s), 0 from the servers, 0 failed,"
            " 1 already stored)",
        )
        stages = measure.stage_times([OUT_KEY, query, SYNCING, prefetched], T0, ROOM)
        self.assertEqual(stages["last key fetched"], 4.5)
        self.assertEqual(stages["module:keys prefetched"], 4.75)
        self.assertEqual(measure.endpoint_of("/_matrix/key/v2/query"), "key/query")

    def test_new_stage_is_one_entry(self) -> None:
        stages = [
            *measure.STAGES,
            ("queued", r"Syncing state for room {room} via (?P<stage>\S+)"),
        ]
        got = measure.stage_times([SYNCING], T0, ROOM, stages=stages)
        self.assertEqual(got["queued:127.0.0.1:24257"], 1.25)


class StageSpans(unittest.TestCase):
    # Joiner: 1 CPU second per second throughout; PostgreSQL: idle for 4 s,
    # then 0.5 core.
    SAMPLES = [
        (T0 + t, 10.0 + t, 3.0 + max(0.0, t - 4.0) * 0.5)
        for t in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    ]

    def test_cpu_interpolated_between_samples(self) -> None:
        self.assertEqual(measure.cpu_at(self.SAMPLES, T0 + 2.5, 1), 12.5)
        self.assertEqual(measure.cpu_at(self.SAMPLES, T0 + 5.5, 2), 3.75)
        self.assertIsNone(measure.cpu_at(self.SAMPLES, T0 - 1, 1))
        self.assertIsNone(measure.cpu_at(self.SAMPLES, T0 + 9, 1))
        self.assertIsNone(measure.cpu_at([], T0, 1))

    def test_each_stage_spans_from_the_one_before(self) -> None:
        spans = measure.stage_spans({"stored": 8.0, "fetched": 4.0}, T0, self.SAMPLES)
        self.assertEqual(spans["took:fetched"], 4.0)
        self.assertEqual(spans["took:stored"], 4.0)
        self.assertEqual(spans["cores:fetched"], 1.0)
        self.assertEqual(spans["cores:stored"], 1.0)
        self.assertEqual(spans["dbcores:fetched"], 0.0)
        self.assertEqual(spans["dbcores:stored"], 0.5)

    def test_no_database_cores_without_database_samples(self) -> None:
        sqlite = [(t, cpu, 0.0) for t, cpu, _ in self.SAMPLES]
        spans = measure.stage_spans({"stored": 8.0}, T0, sqlite)
        self.assertEqual(spans["cores:stored"], 1.0)
        self.assertNotIn("dbcores:stored", spans)

    def test_short_or_uncovered_spans_have_no_cores(self) -> None:
        spans = measure.stage_spans({"a": 1.0, "b": 1.1, "c": 20.0}, T0, self.SAMPLES)
        self.assertEqual(spans["took:b"], 0.1)
        self.assertNotIn("cores:b", spans)
        self.assertEqual(spans["took:c"], 18.9)
        self.assertNotIn("cores:c", spans)  # sampling ended at 8 s
        self.assertIn("cores:a", spans)


class CliHelpers(unittest.TestCase):
    def test_sizes(self) -> None:
        self.assertEqual(
            cli.parse_sizes("1000,10_000,100000"),
            [(1000, 50), (10000, 200), (100000, 2000)],
        )
        self.assertEqual(cli.parse_sizes("5000:100"), [(5000, 100)])
        self.assertEqual(cli.parse_sizes("20000"), [(20000, 400)])
        for bad in ("", "abc", "100:1000", "5"):
            with self.assertRaises(ValueError):
                cli.parse_sizes(bad)

    def test_plan_alternates_the_first_variant(self) -> None:
        steps = cli.plan(3, ["sqlite"], [(1000, 50)], ["stock", "module"])
        self.assertEqual([s[4][0] for s in steps], ["stock", "module", "stock"])
        steps = cli.plan(
            2, ["sqlite", "postgres"], [(1000, 50), (10000, 200)], ["stock", "module"]
        )
        self.assertEqual(len(steps), 8)
        for db in ("sqlite", "postgres"):
            for size in (1000, 10000):
                firsts = [s[4][0] for s in steps if s[1] == db and s[2] == size]
                self.assertEqual(sorted(firsts), ["module", "stock"])

    def test_plan_with_both_key_setups(self) -> None:
        steps = cli.plan(
            1, ["sqlite"], [(2000, 200)], ["stock", "module"], ["direct", "notary"]
        )
        self.assertEqual(
            [(s[5], s[4][0]) for s in steps],
            [("direct", "stock"), ("notary", "module")],
        )
        args = cli.resolve(cli.build_parser().parse_args(["--quick", "--key-notary"]))
        self.assertEqual(args.key_setups, ["direct", "notary"])
        args = cli.resolve(cli.build_parser().parse_args(["--quick"]))
        self.assertEqual(args.key_setups, ["direct"])
        with self.assertRaises(ValueError):
            cli.resolve(cli.build_parser().parse_args(["--keys", "perspectives"]))

    def test_quick_defaults(self) -> None:
        args = cli.resolve(cli.build_parser().parse_args(["--quick"]))
        self.assertEqual(
            (args.sizes_list, args.runs, args.dbs), ([(1000, 50)], 1, ["sqlite"])
        )
        args = cli.resolve(cli.build_parser().parse_args([]))
        self.assertEqual((args.runs, args.dbs), (3, ["sqlite", "postgres"]))
        self.assertEqual(len(args.sizes_list), 3)
        with self.assertRaises(ValueError):
            cli.resolve(cli.build_parser().parse_args(["--db", "mysql"]))

    def test_progress_bar(self) -> None:
        out = io.StringIO()
        p = Progress(4, stream=out)
        p.step_started("run 1")
        p.phase("joining")
        p.step_done(1)
        text = out.getvalue()
        self.assertIn("run 1: joining", text)
        self.assertIn(" 25%", text)
        self.assertIn("left", text)


class WaitUntilIdle(unittest.TestCase):
    def run_with(self, rates: list[float], **kw: Any) -> float:
        """Simulated clock; ``rates[i]``: cores used in the i-th half second."""
        state = {"now": 0.0, "cpu": 0.0, "step": 0}

        def sleep(seconds: float) -> None:
            i = min(int(state["step"]), len(rates) - 1)
            state["cpu"] += rates[i] * seconds
            state["now"] += seconds
            state["step"] += 1

        return measure.wait_until_idle(
            lambda: state["cpu"],
            clock=lambda: state["now"],
            sleep=sleep,
            **kw,
        )

    def test_idle_at_once_waits_only_the_quiet_period(self) -> None:
        self.assertEqual(self.run_with([0.0]), 2.0)

    def test_waits_for_the_busy_part_to_pass(self) -> None:
        # 5 s at one core, then idle: quiet 2 s after the busy part ends.
        waited = self.run_with([1.0] * 10 + [0.0])
        self.assertGreaterEqual(waited, 7.0)
        self.assertLessEqual(waited, 7.5)

    def test_gives_up_after_max_wait(self) -> None:
        self.assertEqual(self.run_with([1.0], max_wait=10.0), 10.0)


if __name__ == "__main__":
    unittest.main()


class AfterMetricsTests(unittest.TestCase):
    """``measure.after_metrics``: the joiner in the time after its full member
    list (``--after``)."""

    def samples(self, rates: list[float], db_rate: float = 0.0) -> list[Any]:
        """One sample a second from T0 - 1, the joiner using ``rates[i]`` cores
        in second i (from T0)."""
        out = [(T0 - 1, 10.0, 5.0), (T0, 10.0, 5.0)]
        cpu, db = 10.0, 5.0
        for i, rate in enumerate(rates):
            cpu += rate
            db += db_rate
            out.append((T0 + i + 1, cpu, db))
        return out

    def test_cpu_and_busy_time(self) -> None:
        # busy (1 core) for 5 s, then idle (0.05 cores) for 15 s
        samples = self.samples([1.0] * 5 + [0.05] * 15, db_rate=0.5)
        m = measure.after_metrics(samples, T0, 20)
        self.assertEqual(m["cpu_after_s"], 5.75)
        self.assertEqual(m["db_cpu_after_s"], 10.0)
        # the last 2-s stretch at >= 0.15 cores ends 6 s in (1 busy s + 1 idle s)
        self.assertEqual(m["busy_after_s"], 6.0)

    def test_quiet_at_once(self) -> None:
        m = measure.after_metrics(self.samples([0.01] * 10), T0, 10)
        self.assertEqual(m["busy_after_s"], 0.0)
        self.assertEqual(m["cpu_after_s"], 0.1)

    def test_busy_throughout(self) -> None:
        m = measure.after_metrics(self.samples([0.5] * 10), T0, 10)
        self.assertEqual(m["busy_after_s"], 10.0)

    def test_window_beyond_the_samples_has_no_cpu_figure(self) -> None:
        m = measure.after_metrics(self.samples([0.5] * 3), T0, 10)
        self.assertNotIn("cpu_after_s", m)
