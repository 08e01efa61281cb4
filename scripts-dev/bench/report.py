"""Benchmark results: medians, module/stock ratios, the stdout table, JSON and a plot.

Pure functions over a list of run records, so they are unit-tested without any
homeserver. A run record is a dict::

    {"variant": "stock"|"module", "scenario": "join", "db": "sqlite",
     "members": 1000, "servers": 50, "run": 0, "metrics": {"join_s": 0.8, ...}}

Besides the figures of :data:`METRICS`, ``metrics`` may hold breakdown figures
named ``<kind>:<name>`` (:data:`BREAKDOWNS`): ``stage:resync complete`` (seconds
after ``/join`` started), ``bytes:state`` (MiB hs2 received from that endpoint),
``serve:send_join`` (seconds the resident spent serving it), and per stage
``took:<stage>`` (seconds since the stage before), ``cores:<stage>`` and
``dbcores:<stage>`` (CPU per second of the joiner and of its PostgreSQL backends
meanwhile: a stage near 1 joiner core is bound by Python's one thread of
execution, one with busy backends by the database). They get their own
table below the main one and are not plotted.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Metric name -> (label, unit, lower_is_better).
METRICS: dict[str, tuple[str, str, bool]] = {
    "join_s": ("/join returns", "s", True),
    "message_remote_s": ("message seen remotely", "s", True),
    "full_members_s": ("full member list", "s", True),
    "messages_s": ("/messages right after /join", "s", True),
    "peak_rss_mib": ("joiner peak RSS", "MiB", True),
    "cpu_s": ("joiner CPU", "s", True),
    "cpu_after_s": ("joiner CPU in the time after (--after)", "s", True),
    "db_cpu_after_s": ("its PostgreSQL's CPU in the time after", "s", True),
    "busy_after_s": ("joiner busy after the full member list", "s", True),
    "resident_cpu_s": ("resident CPU during join", "s", True),
    "fed_bytes_mib": ("federation bytes in", "MiB", True),
    "send_join_s": ("resident send_join", "s", True),
    "send_join_2_s": ("resident send_join, second", "s", True),
    "send_join_mib": ("send_join size", "MiB", True),
    "state_ids_s": ("resident /state_ids", "s", True),
    "state_ids_mib": ("/state_ids size", "MiB", True),
    "state_s": ("resident /state", "s", True),
    "state_mib": ("/state size", "MiB", True),
    "state_repeat_s": ("resident /state, again", "s", True),
    "state_cold_s": ("resident /state, new event", "s", True),
    "resident_peak_rss_mib": ("resident peak RSS serving", "MiB", True),
    "resident_rss_growth_mib": ("resident RSS growth serving", "MiB", True),
    "resident_serve_cpu_s": ("resident CPU serving", "s", True),
    "real_join_s": ("a real joiner's /join via the resident", "s", True),
}

#: Breakdown prefix -> (label template, unit).
BREAKDOWNS: dict[str, tuple[str, str]] = {
    "stage": ("stage: {}", "s after /join"),
    "took": ("stage took: {}", "s since the stage before"),
    "cores": ("joiner CPU during: {}", "cores"),
    "dbcores": ("its PostgreSQL during: {}", "cores"),
    "bytes": ("bytes from {}", "MiB"),
    "serve": ("resident serves {}", "s"),
}

Key = tuple[str, str, int, int]  # scenario, db, members, servers


def metric_info(metric: str) -> tuple[str, str, bool] | None:
    """(label, unit, lower_is_better) of a main or breakdown metric; None if unknown."""
    if metric in METRICS:
        return METRICS[metric]
    kind, sep, name = metric.partition(":")
    if sep and kind in BREAKDOWNS:
        label, unit = BREAKDOWNS[kind]
        return label.format(name), unit, True
    return None


def group_samples(
    runs: Iterable[Mapping[str, Any]],
) -> dict[Key, dict[str, dict[str, list[float]]]]:
    """{(scenario, db, members, servers): {variant: {metric: [values]}}}."""
    samples: dict[Key, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for run in runs:
        key = (run["scenario"], run["db"], int(run["members"]), int(run["servers"]))
        for metric, value in (run.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    samples[key][run["variant"]][metric].append(float(value))
    return samples


def group_medians(
    runs: Iterable[Mapping[str, Any]],
) -> dict[Key, dict[str, dict[str, float]]]:
    """{(scenario, db, members, servers): {variant: {metric: median}}}."""
    return {
        key: {
            variant: {m: statistics.median(vs) for m, vs in metrics.items()}
            for variant, metrics in variants.items()
        }
        for key, variants in group_samples(runs).items()
    }


def ratio(module: float | None, stock: float | None) -> float | None:
    """module / stock, or None when either is missing or stock is zero."""
    if module is None or stock is None or stock == 0:
        return None
    return module / stock


def _metric_order(metric: str) -> tuple[int, float, str]:
    if metric in METRICS:
        return (0, list(METRICS).index(metric), "")
    kind = metric.partition(":")[0]
    kinds = list(BREAKDOWNS)
    return (1 + (kinds.index(kind) if kind in kinds else len(kinds)), 0, metric)


def _sort_key(
    metric: str,
    stock: Mapping[str, Sequence[float]],
    module: Mapping[str, Sequence[float]],
) -> tuple[int, float, str]:
    """Main metrics as listed; stages, and each stage's duration and CPU, in
    time order (stock's, else module's); then bytes and serving times by name."""
    first, index, name = _metric_order(metric)
    kind, _, stage = metric.partition(":")
    if kind in ("stage", "took", "cores", "dbcores"):
        when = _median(stock.get(f"stage:{stage}"))
        if when is None:
            when = _median(module.get(f"stage:{stage}"))
        index = when if when is not None else 0
    return (first, index, name)


def table_rows(
    runs: Sequence[Mapping[str, Any]], breakdowns: bool = False
) -> list[tuple[str, ...]]:
    """Rows (header first) of the main table, or of the breakdown table."""
    samples = group_samples(runs)
    header = (
        "scenario",
        "db",
        "members",
        "servers",
        "metric",
        "n",
        "stock",
        "module",
        "module/stock",
    )
    rows: list[tuple[str, ...]] = [header]
    for key in sorted(samples):
        scenario, db, members, servers = key
        variants = samples[key]
        stock = variants.get("stock", {})
        module = variants.get("module", {})
        metrics = {m for m in (*stock, *module) if metric_info(m) is not None}
        metrics = {m for m in metrics if (m in METRICS) != breakdowns}

        for metric in sorted(metrics, key=lambda m: _sort_key(m, stock, module)):
            info = metric_info(metric)
            assert info is not None
            label, unit, _ = info
            s, m = _median(stock.get(metric)), _median(module.get(metric))
            r = ratio(m, s)
            n = min(len(stock.get(metric, [])), len(module.get(metric, []))) or max(
                len(stock.get(metric, [])), len(module.get(metric, []))
            )
            rows.append(
                (
                    scenario,
                    db,
                    f"{members:,}",
                    f"{servers:,}",
                    f"{label} ({unit})",
                    str(n),
                    _fmt(s),
                    _fmt(m),
                    "-" if r is None else f"{r:.2f}x",
                )
            )
    return rows


def _median(values: Sequence[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _render(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) for cell, w in zip(row, widths, strict=True)
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(runs: Sequence[Mapping[str, Any]], breakdowns: bool = False) -> str:
    """A plain-text table: one row per (room, metric), stock vs module and ratio.

    ``n`` is the number of runs behind each median; ``breakdowns=True`` gives the
    table of stage times, bytes per endpoint and resident serving times."""
    return _render(table_rows(runs, breakdowns=breakdowns))


def format_errors(runs: Sequence[Mapping[str, Any]]) -> str:
    """One line per failed run, empty if none failed."""
    lines = []
    for r in runs:
        if r.get("error"):
            lines.append(
                f"run {r.get('run')} {r['scenario']} {r['variant']} {r['db']}"
                f" {int(r['members']):,}: {r['error']}"
            )
    return "\n".join(lines)


def format_report(
    machine_line: str, runs: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()
) -> str:
    """Everything printed on stdout at the end: machine, notes, tables, errors."""
    parts = [f"Machine: {machine_line}"]
    parts += [f"Note: {n}" for n in notes]
    parts += ["", "Medians (module/stock < 1 means the module is better):", ""]
    main = table_rows(runs)
    parts.append(_render(main) if len(main) > 1 else "(no successful measurement)")
    breakdown = table_rows(runs, breakdowns=True)
    if len(breakdown) > 1:
        parts += ["", "Breakdown (medians):", "", _render(breakdown)]
    errors = format_errors(runs)
    if errors:
        parts += ["", "Failed runs:", errors]
    return "\n".join(parts) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) < 0.1 and value != 0:
        return f"{value:.3f}"
    return f"{value:.2f}"


def write_json(
    path: str,
    machine: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    **extra: Any,
) -> None:
    """Write ``{"machine", "runs", **extra}`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(
            {"machine": machine, "runs": list(runs), **extra},
            f,
            indent=1,
            sort_keys=True,
        )
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
    """The dict :func:`write_json` wrote."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "runs" not in data:
        raise ValueError(f"{path} is not a benchmark results file")
    return data


def plot(path: str, runs: Sequence[Mapping[str, Any]], title: str) -> list[str]:
    """One panel per (scenario, db, metric): stock and module against room size.

    Returns the metrics plotted. Uses matplotlib's non-interactive backend. A panel
    whose values span more than 30x gets a logarithmic y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = group_medians(runs)
    panels: dict[tuple[str, str, str], dict[str, list[tuple[int, float]]]] = (
        defaultdict(lambda: defaultdict(list))
    )
    for (scenario, db, members, _servers), variants in medians.items():
        for variant, metrics in variants.items():
            for metric, value in metrics.items():
                if metric in METRICS:
                    panels[(scenario, db, metric)][variant].append((members, value))
    if not panels:
        return []
    # Same figure on each database side by side.
    keys = sorted(panels, key=lambda k: (k[0], list(METRICS).index(k[2]), k[1]))
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False
    )
    for ax, key in zip(axes.flat, keys, strict=False):
        scenario, db, metric = key
        label, unit, _ = METRICS[metric]
        sizes = sorted({m for pts in panels[key].values() for m, _ in pts})
        width = 0.38
        values_seen: list[float] = []
        for offset, variant, colour in (
            (-width / 2, "stock", "#888888"),
            (width / 2, "module", "#2a7ab0"),
        ):
            values = dict(panels[key].get(variant, []))
            xs = [i + offset for i, s in enumerate(sizes) if s in values]
            ys = [values[s] for s in sizes if s in values]
            values_seen += ys
            ax.bar(xs, ys, width=width, label=variant, color=colour)
        positive = [v for v in values_seen if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
        ax.set_xlabel("room members")
        ax.set_ylabel(unit)
        ax.set_title(f"{label} [{scenario}, {db}]", fontsize=9)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.94, 1 - 0.5 / (3.4 * rows)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return sorted({k[2] for k in keys}, key=list(METRICS).index)


def plot_headline(path: str, runs: Sequence[Mapping[str, Any]], title: str) -> bool:
    """The one-look figure: full member list against room size, stock and module,
    each database a colour, log-log (medians). False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for (scenario, db, members, _servers), variants in group_medians(runs).items():
        if scenario != "join":
            continue
        for variant, metrics in variants.items():
            if metrics.get("full_members_s"):
                lines[(db, variant)].append((members, metrics["full_members_s"]))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = {"postgres": "#2a7ab0", "sqlite": "#c0622b"}
    for (db, variant), points in sorted(lines.items()):
        points.sort()
        ax.plot(
            [m for m, _ in points],
            [v for _, v in points],
            linestyle="-" if variant == "module" else "--",
            marker="o",
            color=colours.get(db, "#555555"),
            label=f"{variant}, {'PostgreSQL' if db == 'postgres' else 'SQLite'}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("room members")
    ax.set_ylabel("seconds from /join to the full member list")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
