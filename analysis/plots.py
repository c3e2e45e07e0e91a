"""Report figures (matplotlib, Agg): each function takes rows (dicts) and a path, writes a PNG.

A panel per (model, dataset) where the question is per task; anomalous cells are drawn as red
crosses and named in the legend, never as wins; a dequantized kernel's latency is hatched and
labelled as dense-matmul speed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from analysis.quality import higher_is_better

Row = dict[str, Any]
MAX_PANELS = 24


def _panels(n: int, width: float = 4.6, height: float = 3.4):
    n = max(1, min(n, MAX_PANELS))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _empty(path: Path, message: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
    return _save(fig, path)


def _arrow(metric: str) -> str:
    direction = higher_is_better(metric)
    return "" if direction is None else (" (higher is better)" if direction else " (lower is better)")


def series_label(row: Row) -> str:
    """Method and its parameters, without bits and group size (those are the axes)."""
    params = (row.get("method_params") or "{}").strip("{}").replace('"', "").replace(" ", "")
    params = ",".join(p for p in params.split(",") if p and not p.startswith("fallback:"))
    return row["method"] + (f"({params})" if params else "")


def quality_vs_bits(cells: list[Row], flagged: set[str], path: Path) -> Path:
    """Primary metric vs effective bits per weight, one line per method; baseline dashed."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in cells:
        if row["status"] == "ok" and row["primary_value"] is not None:
            groups[(row["model"], row["dataset"], row["primary_metric"])].append(row)
    if not groups:
        return _empty(path, "no ok cells to plot")
    fig, axes = _panels(len(groups))
    for ax, ((model, dataset, metric), rows) in zip(axes, sorted(groups.items())):
        series: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            if row["method"] == "baseline":
                ax.axhline(row["primary_value"], ls="--", color="black", lw=1,
                           label=f"baseline ({row.get('dtype') or 'dense'})")
            elif row["bits_per_weight"] is not None:
                series[series_label(row)].append(row)
        for label, points in sorted(series.items()):
            points.sort(key=lambda r: r["bits_per_weight"])
            ax.plot([r["bits_per_weight"] for r in points], [r["primary_value"] for r in points],
                    marker="o", ms=4, lw=1, label=label)
            _mark_anomalies(ax, points, flagged, lambda r: r["bits_per_weight"])
        _label_panel(ax, model, dataset, metric, "effective bits per weight (scales, zeros included)")
    return _save(fig, path)


def recovery_heatmap(deltas: list[Row], path: Path) -> Path:
    """Group size x bits grid of recovery % (best over a method's parameters), per model,
    dataset and method."""
    groups: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for row in deltas:
        if row["recovery_pct"] is None or row["bits"] is None or row["group_size"] is None:
            continue
        key = (row["model"], row["dataset"], row["method"])
        cell = (row["group_size"], row["bits"])
        groups[key][cell] = max(groups[key].get(cell, -math.inf), row["recovery_pct"])
    if not groups:
        return _empty(path, "no quantized cell with a baseline to compare with")
    fig, axes = _panels(len(groups), width=4.2, height=3.2)
    for ax, ((model, dataset, method), grid) in zip(axes, sorted(groups.items())):
        sizes = sorted({g for g, _ in grid}, key=lambda g: (g == -1, g))
        bits = sorted({b for _, b in grid})
        values = [[grid.get((g, b), math.nan) for b in bits] for g in sizes]
        image = ax.imshow(values, cmap="RdYlGn", vmin=50, vmax=100, aspect="auto")
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(bits)), [str(b) for b in bits])
        ax.set_yticks(range(len(sizes)), ["per-channel" if g == -1 else str(g) for g in sizes])
        ax.set_xlabel("bits")
        ax.set_ylabel("group size")
        ax.set_title(f"{model} / {dataset} / {method}: recovery %", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def pareto_fronts(cells: list[Row], front: list[Row], flagged: set[str], path: Path) -> Path:
    """Score vs weight size per (model, dataset): every ok cell, the front highlighted."""
    on_front = {r["cell_id"] for r in front}
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in cells:
        if row["status"] == "ok" and row["primary_value"] is not None and row["weight_bytes"]:
            groups[(row["model"], row["dataset"], row["primary_metric"])].append(row)
    if not groups:
        return _empty(path, "no ok cells with a weight size")
    fig, axes = _panels(len(groups))
    for ax, ((model, dataset, metric), rows) in zip(axes, sorted(groups.items())):
        ax.scatter([r["weight_bytes"] / 1e6 for r in rows], [r["primary_value"] for r in rows],
                   color="lightgray", s=18, label="cell")
        best = sorted((r for r in rows if r["cell_id"] in on_front), key=lambda r: r["weight_bytes"])
        ax.plot([r["weight_bytes"] / 1e6 for r in best], [r["primary_value"] for r in best],
                marker="o", color="tab:blue", lw=1, label="Pareto front (quality, size, latency)")
        for r in best:
            ax.annotate(_short(r, model=False), (r["weight_bytes"] / 1e6, r["primary_value"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        _mark_anomalies(ax, rows, flagged, lambda r: r["weight_bytes"] / 1e6)
        _label_panel(ax, model, dataset, metric, "weight MB")
    return _save(fig, path)


def latency_memory(cells: list[Row], path: Path) -> Path:
    """Per-token latency and measured peak memory per config (median over its datasets)."""
    by_config: dict[str, list[Row]] = defaultdict(list)
    for row in cells:
        if row["status"] == "ok":
            by_config[_short(row)].append(row)
    if not by_config:
        return _empty(path, "no ok cells")
    labels = sorted(by_config)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.8 + 0.35 * len(labels)), squeeze=True)
    latency = [_median([r.get("tpot_p50_ms") for r in by_config[k]]) for k in labels]
    dequantized = [any(r.get("kernel") == "dequantized" for r in by_config[k]) for k in labels]
    bars = left.barh(labels, [v if v is not None else 0 for v in latency], color="tab:orange")
    for bar, dq in zip(bars, dequantized):
        if dq:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    left.set_xlabel("tpot_p50_ms at batch 1 (hatched: dequantized weights, dense-matmul speed)")
    left.tick_params(axis="y", labelsize=7)
    memory = [_median([_memory(r) for r in by_config[k]]) for k in labels]
    weights = [_median([r.get("weight_bytes") for r in by_config[k]]) for k in labels]
    right.barh(labels, [(v or 0) / 1e6 for v in memory], color="tab:purple", alpha=0.5,
               label="measured peak (NVML, CUDA reserved or RSS)")
    right.barh(labels, [(v or 0) / 1e6 for v in weights], color="tab:green", height=0.4,
               label="weight bytes")
    right.set_xlabel("MB")
    right.tick_params(axis="y", labelleft=False)
    right.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def status_summary(cells: list[Row], path: Path) -> Path:
    """Cells per method and status."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in cells:
        counts[row["method"]][row["status"]] += 1
    if not counts:
        return _empty(path, "the store has no rows")
    methods = sorted(counts)
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.4 * len(methods)))
    left = [0] * len(methods)
    colours = {"ok": "tab:green", "skipped": "tab:gray", "failed": "tab:red", "timeout": "tab:orange"}
    for status, colour in colours.items():
        values = [counts[m].get(status, 0) for m in methods]
        ax.barh(methods, values, left=left, color=colour, label=status)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("cells")
    ax.legend(fontsize=7, ncols=4)
    return _save(fig, path)


def _memory(row: Row) -> float | None:
    for key in ("nvml_peak_process_bytes", "cuda_peak_reserved_bytes", "peak_rss_bytes"):
        if row.get(key) is not None:
            return row[key]
    return None


def _median(values: list[Any]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def _short(row: Row, model: bool = True) -> str:
    bits = f" w{row['bits']}" if row.get("bits") is not None else ""
    group = f" g{row['group_size']}" if row.get("group_size") is not None else ""
    return (f"{row['model']} " if model else "") + f"{series_label(row)}{bits}{group}"


def _mark_anomalies(ax, rows: list[Row], flagged: set, x) -> None:
    """Red crosses over flagged cells: shown, never presented as wins."""
    bad = [r for r in rows if r["cell_id"] in flagged]
    if bad:
        ax.scatter([x(r) for r in bad], [r["primary_value"] for r in bad],
                   marker="x", s=80, color="red", zorder=5, label="anomaly (not a win)")


def _label_panel(ax, model: str, dataset: str, metric: str, xlabel: str) -> None:
    ax.set_title(f"{model} / {dataset}", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric + _arrow(metric), fontsize=8)
    _legend(ax)


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=6)
