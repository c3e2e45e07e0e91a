"""Report figures (matplotlib, Agg): each function takes rows (dicts) and a path, writes a PNG
and returns a ``Figure`` (its path and a note on what it leaves out).

A panel per (model, dataset) where the question is per task (per model for latency and memory),
at most ``MAX_PANELS`` of them, and in each panel the ``TOP_K`` best series, configs or labels
(the rest are drawn as grey points, or counted in the note), so that a store of ten thousand
cells gives pages as readable as a store of ten. Anomalous cells are drawn as red crosses and
named in the legend, never as wins; a dequantized kernel's latency is hatched and labelled as
dense-matmul speed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from analysis.quality import higher_is_better

Row = dict[str, Any]
MAX_PANELS = 24  # per figure; the first by (model, dataset), the note says how many more
TOP_K = 6  # series, bars or labels per panel


@dataclass(frozen=True)
class Figure:
    path: Path
    omitted: str = ""  # what the figure leaves out, for its caption; empty when nothing


def _omitted(panels: int, what: str = "(model, dataset) panels") -> str:
    if panels <= MAX_PANELS:
        return ""
    return f"Showing the first {MAX_PANELS} of {panels} {what}; qsweep query gives every one."


def _top(rows: list[Row], key, k: int = TOP_K) -> list[Row]:
    return sorted(rows, key=key)[:k]


def _panels(n: int, width: float = 4.6, height: float = 3.4):
    n = max(1, min(n, MAX_PANELS))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path, left: float = 0.07) -> Path:
    if len(fig.axes) <= 8:
        fig.tight_layout()
    else:  # tight_layout lays every text out once more: seconds over a grid of panels
        height = fig.get_figheight()  # inches: margins of a fixed size, gaps a fraction of a panel
        fig.subplots_adjust(left=left, right=0.97, top=1 - 0.3 / height, bottom=0.5 / height,
                            wspace=0.45, hspace=0.5)
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


def _better(metric: str):
    """Sort key: best score first, whichever the metric's direction."""
    sign = -1 if higher_is_better(metric) is not False else 1
    return lambda value: sign * value


def quality_vs_bits(cells: list[Row], flagged: set[str], path: Path) -> Figure:
    """Primary metric vs effective bits per weight, one line per method (the ``TOP_K`` with the
    best scores; the others as grey points); baseline dashed."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in cells:
        if row["status"] == "ok" and row["primary_value"] is not None:
            groups[(row["model"], row["dataset"], row["primary_metric"])].append(row)
    if not groups:
        return Figure(_empty(path, "no ok cells to plot"))
    fig, axes = _panels(len(groups))
    hidden = 0
    for ax, ((model, dataset, metric), rows) in zip(axes, sorted(groups.items())):
        series: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            if row["method"] == "baseline":
                ax.axhline(row["primary_value"], ls="--", color="black", lw=1,
                           label=f"baseline ({row.get('dtype') or 'dense'})")
            elif row["bits_per_weight"] is not None:
                series[series_label(row)].append(row)
        better = _better(metric)
        ranked = sorted(series, key=lambda label: (min(better(r["primary_value"]) for r in series[label]), label))
        rest = [r for label in ranked[TOP_K:] for r in series[label]]
        if rest:
            hidden += len(ranked) - TOP_K
            ax.scatter([r["bits_per_weight"] for r in rest], [r["primary_value"] for r in rest], s=6,
                       color="lightgray", label=f"{len(ranked) - TOP_K} other methods")
        for label in sorted(ranked[:TOP_K]):
            points = sorted(series[label], key=lambda r: r["bits_per_weight"])
            ax.plot([r["bits_per_weight"] for r in points], [r["primary_value"] for r in points],
                    marker="o", ms=4, lw=1, label=label)
        _mark_anomalies(ax, rows, flagged, lambda r: r["bits_per_weight"])
        _label_panel(ax, model, dataset, metric, "effective bits per weight (scales, zeros included)")
    note = " ".join(filter(None, [_omitted(len(groups)), hidden and
                                  f"Each panel draws its {TOP_K} best methods as lines, the others as grey points."]))
    return Figure(_save(fig, path), note)


def recovery_heatmap(deltas: list[Row], path: Path) -> Figure:
    """Group size x bits grid of recovery % (best over a method's parameters), per model,
    dataset and method; within a (model, dataset), the methods with the best recovery first."""
    groups: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for row in deltas:
        if row["recovery_pct"] is None or row["bits"] is None or row["group_size"] is None:
            continue
        key = (row["model"], row["dataset"], row["method"])
        cell = (row["group_size"], row["bits"])
        groups[key][cell] = max(groups[key].get(cell, -math.inf), row["recovery_pct"])
    if not groups:
        return Figure(_empty(path, "no quantized cell with a baseline to compare with"))
    order = sorted(groups, key=lambda k: (k[0], k[1], -_finite_max(groups[k].values()), k[2]))
    fig, axes = _panels(len(groups), width=4.2, height=3.2)
    for ax, key in zip(axes, order):
        model, dataset, method = key
        grid = groups[key]
        sizes = sorted({g for g, _ in grid}, key=lambda g: (g == -1, g))
        bits = sorted({b for _, b in grid})
        values = [[grid.get((g, b), math.nan) for b in bits] for g in sizes]
        image = ax.imshow(values, cmap="RdYlGn", vmin=50, vmax=100, aspect="auto")
        if len(sizes) * len(bits) <= 64:  # numbers only where they stay legible
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
    return Figure(_save(fig, path), _omitted(len(groups), "(model, dataset, method) panels"))


def sensitivity_heatmap(rows: list[Row], path: Path) -> Figure:
    """Unit x option grid of KL divergence from the baseline (log colour scale), one panel per
    (model, dataset, unit kind, method) of a sensitivity study (the ``sensitivity`` view); the
    metric's delta where a dataset has no KL."""
    panels: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    order: dict[tuple, dict[str, tuple]] = defaultdict(dict)
    for row in rows:
        value = row["kl_divergence"] if row["kl_divergence"] is not None else row["delta"]
        if value is None:
            continue
        key = (row["model"], row["dataset"], row["unit_kind"], row["method"],
               "KL" if row["kl_divergence"] is not None else f"delta {row['metric']}")
        panels[key][(row["unit"], row["option"])] = value
        order[key][row["unit"]] = (row["block"] if row["block"] is not None else -1, row["unit"])
    if not panels:
        return Figure(_empty(path, "no sensitivity study in the store"))
    keys = sorted(panels)
    height = max(3.2, min(12, 0.22 * max(len(order[k]) for k in keys) + 1.5))
    fig, axes = _panels(len(keys), width=4.6, height=height)
    for ax, key in zip(axes, keys):
        model, dataset, kind, method, measure = key
        grid = panels[key]
        units = sorted(order[key], key=lambda u: order[key][u])
        options = sorted({o for _, o in grid}, key=lambda o: [int(t[1:]) if t[1:].isdigit() else 0 for t in o.split()])
        values = [[grid.get((u, o), math.nan) for o in options] for u in units]
        finite = [v for line in values for v in line if math.isfinite(v) and v > 0]
        if measure == "KL" and finite:
            from matplotlib.colors import LogNorm

            image = ax.imshow(values, cmap="magma_r", aspect="auto", norm=LogNorm(min(finite), max(finite)))
        else:
            image = ax.imshow(values, cmap="magma_r", aspect="auto")
        ax.set_xticks(range(len(options)), [o.strip() for o in options], fontsize=8)
        step = max(1, len(units) // 32)
        ax.set_yticks(range(0, len(units), step), [units[i] for i in range(0, len(units), step)], fontsize=7)
        ax.set_xlabel("option (bits, group size)")
        ax.set_ylabel(kind)
        ax.set_title(f"{model} / {dataset} / {method}: {measure}, one {kind} quantized", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return Figure(_save(fig, path), _omitted(len(keys), "(model, dataset, unit kind, method) panels"))


def _finite_max(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else -math.inf


def pareto_fronts(cells: list[Row], front: list[Row], flagged: set[str], path: Path) -> Figure:
    """Score vs weight size per (model, dataset): every ok cell, the front highlighted, at most
    ``TOP_K`` of its points named."""
    on_front = {r["cell_id"] for r in front}
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in cells:
        if row["status"] == "ok" and row["primary_value"] is not None and row["weight_bytes"]:
            groups[(row["model"], row["dataset"], row["primary_metric"])].append(row)
    if not groups:
        return Figure(_empty(path, "no ok cells with a weight size"))
    fig, axes = _panels(len(groups))
    for ax, ((model, dataset, metric), rows) in zip(axes, sorted(groups.items())):
        ax.scatter([r["weight_bytes"] / 1e6 for r in rows], [r["primary_value"] for r in rows],
                   color="lightgray", s=18 if len(rows) <= 200 else 6, label="cell")
        best = sorted((r for r in rows if r["cell_id"] in on_front), key=lambda r: r["weight_bytes"])
        ax.plot([r["weight_bytes"] / 1e6 for r in best], [r["primary_value"] for r in best],
                marker="o", ms=3, color="tab:blue", lw=1, label="Pareto front (quality, size, latency)")
        named = best if len(best) <= TOP_K else [best[round(i * (len(best) - 1) / (TOP_K - 1))]
                                                 for i in range(TOP_K)]
        for r in named:
            ax.annotate(_short(r, model=False), (r["weight_bytes"] / 1e6, r["primary_value"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        _mark_anomalies(ax, rows, flagged, lambda r: r["weight_bytes"] / 1e6)
        _label_panel(ax, model, dataset, metric, "weight MB")
    note = _omitted(len(groups))
    if any(sum(r["cell_id"] in on_front for r in rows) > TOP_K for rows in groups.values()):
        note = " ".join(filter(None, [note, f"At most {TOP_K} front points per panel are named."]))
    return Figure(_save(fig, path), note)


def latency_memory(cells: list[Row], path: Path) -> Figure:
    """Per model: per-token latency and measured peak memory of its ``TOP_K`` fastest configs
    and its baseline (median over their datasets)."""
    by_model: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in cells:
        if row["status"] == "ok":
            by_model[row["model"]][_short(row, model=False)].append(row)
    if not by_model:
        return Figure(_empty(path, "no ok cells"))
    models = sorted(by_model)
    shown = models[:MAX_PANELS // 2]
    picked: dict[str, list[str]] = {}
    for model in shown:
        configs = by_model[model]
        latency = {k: _median([r.get("tpot_p50_ms") for r in v]) for k, v in configs.items()}
        fastest = sorted((k for k in configs if not k.startswith("baseline")),
                         key=lambda k: (latency[k] is None, latency[k] or 0, k))[:TOP_K]
        picked[model] = sorted(k for k in configs if k.startswith("baseline")) + fastest
    heights = [1.0 + 0.3 * len(picked[m]) for m in shown]
    fig, axes = plt.subplots(len(shown), 2, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for (left, right), model in zip(axes, shown):
        configs, labels = by_model[model], picked[model]
        latency = [_median([r.get("tpot_p50_ms") for r in configs[k]]) for k in labels]
        dequantized = [any(r.get("kernel") in ("dequantized", "decompressed") for r in configs[k]) for k in labels]
        bars = left.barh(labels, [v if v is not None else 0 for v in latency], color="tab:orange")
        for bar, dq in zip(bars, dequantized):
            if dq:
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        fastest = len(labels) - sum(k.startswith("baseline") for k in labels)
        left.set_title(f"{model}: baseline and the {fastest} fastest of {len(configs)} configs"
                       if len(configs) > len(labels) else model, fontsize=9)
        left.set_xlabel("tpot_p50_ms at batch 1 (hatched: dequantized weights, dense-matmul speed)", fontsize=7)
        left.tick_params(axis="y", labelsize=7)
        memory = [_median([_memory(r) for r in configs[k]]) for k in labels]
        weights = [_median([r.get("weight_bytes") for r in configs[k]]) for k in labels]
        right.barh(labels, [(v or 0) / 1e6 for v in memory], color="tab:purple", alpha=0.5,
                   label="measured peak (NVML, CUDA reserved or RSS)")
        right.barh(labels, [(v or 0) / 1e6 for v in weights], color="tab:green", height=0.4,
                   label="weight bytes")
        right.set_xlabel("MB", fontsize=7)
        right.tick_params(axis="y", labelleft=False)
        right.legend(fontsize=6, loc="lower right")
    notes = []
    if len(models) > len(shown):
        notes.append(f"Showing the first {len(shown)} of {len(models)} models; qsweep query gives every one.")
    if any(len(by_model[m]) > len(picked[m]) for m in shown):
        notes.append(f"Each model shows its baseline and its {TOP_K} fastest configs.")
    return Figure(_save(fig, path, left=0.2), " ".join(filter(None, notes)))


def status_summary(cells: list[Row], path: Path) -> Figure:
    """Cells per method and status."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in cells:
        counts[row["method"]][row["status"]] += 1
    if not counts:
        return Figure(_empty(path, "the store has no rows"))
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
    return Figure(_save(fig, path))


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
    # quality rises with bits and size for a higher-is-better metric (the lower right is free),
    # falls for a lower-is-better one (the upper right is); matplotlib's "best" placement
    # tests every point of a panel and costs seconds over a large store's panels
    _legend(ax, "upper right" if higher_is_better(metric) is False else "lower right")


def _legend(ax, loc: str = "best") -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=6, loc=loc)
