"""Benchmark results: medians, module/stock ratios, the stdout table, JSON and a plot.

Pure functions over a list of run records, so they are unit-tested without any
homeserver. A run record is a dict::

    {"variant": "stock"|"module", "scenario": "join", "db": "sqlite",
     "members": 1000, "servers": 50, "run": 0, "metrics": {"join_s": 0.8, ...}}
"""

from __future__ import annotations

import json
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
    "peak_rss_mib": ("joiner peak RSS", "MiB", True),
    "cpu_s": ("joiner CPU", "s", True),
    "fed_bytes_mib": ("federation bytes in", "MiB", True),
    "send_join_s": ("resident send_join", "s", True),
    "send_join_mib": ("send_join size", "MiB", True),
    "state_s": ("resident /state", "s", True),
    "state_mib": ("/state size", "MiB", True),
    "state_ids_s": ("resident /state_ids", "s", True),
}

Key = tuple[str, str, int, int]  # scenario, db, members, servers


def group_medians(
    runs: Iterable[Mapping[str, Any]],
) -> dict[Key, dict[str, dict[str, float]]]:
    """{(scenario, db, members, servers): {variant: {metric: median}}}."""
    samples: dict[Key, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for run in runs:
        key = (run["scenario"], run["db"], int(run["members"]), int(run["servers"]))
        for metric, value in run["metrics"].items():
            if isinstance(value, (int, float)):
                samples[key][run["variant"]][metric].append(float(value))
    return {
        key: {
            variant: {m: statistics.median(vs) for m, vs in metrics.items()}
            for variant, metrics in variants.items()
        }
        for key, variants in samples.items()
    }


def ratio(module: float | None, stock: float | None) -> float | None:
    """module / stock, or None when either is missing or stock is zero."""
    if module is None or stock is None or stock == 0:
        return None
    return module / stock


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table: one row per (room, metric), stock vs module and ratio."""
    medians = group_medians(runs)
    header = (
        "scenario",
        "db",
        "members",
        "servers",
        "metric",
        "stock",
        "module",
        "module/stock",
    )
    rows: list[tuple[str, ...]] = [header]
    for key in sorted(medians):
        scenario, db, members, servers = key
        variants = medians[key]
        stock = variants.get("stock", {})
        module = variants.get("module", {})
        for metric, (label, unit, _) in METRICS.items():
            if metric not in stock and metric not in module:
                continue
            r = ratio(module.get(metric), stock.get(metric))
            rows.append(
                (
                    scenario,
                    db,
                    f"{members:,}",
                    f"{servers:,}",
                    f"{label} ({unit})",
                    _fmt(stock.get(metric)),
                    _fmt(module.get(metric)),
                    "-" if r is None else f"{r:.2f}x",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
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


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def write_json(
    path: str, machine: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]
) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine, "runs": list(runs)}, f, indent=1, sort_keys=True)


def plot(path: str, runs: Sequence[Mapping[str, Any]], title: str) -> list[str]:
    """One panel per (scenario, db, metric): stock and module against room size.

    Returns the metrics plotted. Uses matplotlib's non-interactive backend.
    """
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
    keys = sorted(panels)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        scenario, db, metric = key
        label, unit, _ = METRICS[metric]
        sizes = sorted({m for pts in panels[key].values() for m, _ in pts})
        width = 0.38
        for offset, variant, colour in (
            (-width / 2, "stock", "#888888"),
            (width / 2, "module", "#2a7ab0"),
        ):
            values = dict(panels[key].get(variant, []))
            xs = [i + offset for i, s in enumerate(sizes) if s in values]
            ys = [values[s] for s in sizes if s in values]
            ax.bar(xs, ys, width=width, label=variant, color=colour)
        ax.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
        ax.set_xlabel("room members")
        ax.set_ylabel(unit)
        ax.set_title(f"{label} [{scenario}, {db}]", fontsize=9)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return sorted({k[2] for k in keys})
