"""``qsweep recommend``: the best configs that meet a budget, each with its evidence.

Candidates are the ok cells on one dataset and metric (the dataset's primary metric unless
told), from ``baseline_deltas`` plus the baselines themselves (drop 0, recovery 100 %).
Constraints, each optional:

- quality: ``max_drop`` (how much worse than the baseline, in the metric's units; with a
  trailing ``%``, relative to the baseline) or ``min_recovery`` (recovery %, see
  analysis.derived);
- size: ``max_weight_bytes`` (weights as stored or as a packed format stores them);
- memory: ``max_memory`` (the first measured of NVML process, CUDA reserved, CPU RSS peaks
  during evaluation; RSS includes everything the actor held);
- speed: ``max_latency_ms`` (per-token latency tpot_p50_ms at batch size 1; a cell without it
  fails this constraint).

Cells with an anomaly (better than the baseline beyond its uncertainty, a non-finite metric,
larger than the baseline) are set aside, never recommended. When nothing qualifies, the answer
says which constraint binds: the one whose removal alone would leave a qualifying config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import duckdb

from analysis.quality import higher_is_better

Rank = Literal["size", "quality", "latency"]
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

CANDIDATES = """
    select model, config, cell_id, method, bits, group_size, value, baseline_value, quality_drop,
           relative_drop_pct, recovery_pct, delta_stderr, test, p_value, p_value_resolution, paired_n, weight_bytes,
           bits_per_weight, weight_change_pct, memory_bytes, memory_kind, tpot_p50_ms, kernel,
           speed_claim, anomaly
    from baseline_deltas where dataset = $dataset and metric = $metric
    union all
    select c.model, 'baseline', c.cell_id, c.method, c.bits, c.group_size, m.value, m.value, 0, 0, 100,
           null, null, null, null, null, c.weight_bytes, c.bits_per_weight, 0,
           coalesce(c.nvml_peak_process_bytes, c.cuda_peak_reserved_bytes, c.peak_rss_bytes),
           case when c.nvml_peak_process_bytes is not null then 'nvml_peak_process_bytes'
                when c.cuda_peak_reserved_bytes is not null then 'cuda_peak_reserved_bytes'
                when c.peak_rss_bytes is not null then 'peak_rss_bytes' end,
           c.tpot_p50_ms, c.kernel, coalesce(c.kernel not in ('dequantized', 'decompressed'), false),
           case when not coalesce(isfinite(m.value), false) then 'non-finite metric' end
    from cells c join metrics m on m.cell_id = c.cell_id and m.metric = $metric
    where c.method = 'baseline' and c.status = 'ok' and c.dataset = $dataset
"""


class BudgetError(ValueError):
    """A question that cannot be asked of this store (unknown dataset or metric, bad value)."""


@dataclass(frozen=True)
class Budget:
    max_drop: float | None = None
    max_drop_relative: bool = False  # max_drop given as a percentage of the baseline
    min_recovery: float | None = None
    max_weight_bytes: int | None = None
    max_memory: int | None = None
    max_latency_ms: float | None = None

    def constraints(self) -> dict[str, tuple[str, Any]]:
        """name -> (description, test on a candidate row)."""
        out: dict[str, tuple[str, Any]] = {}
        if self.max_drop is not None:
            if self.max_drop_relative:
                out["max-drop"] = (f"drop <= {self.max_drop:g}% of the baseline",
                                   lambda r: _le(r["relative_drop_pct"], self.max_drop))
            else:
                out["max-drop"] = (f"drop <= {self.max_drop:g}",
                                   lambda r: _le(r["quality_drop"], self.max_drop))
        if self.min_recovery is not None:
            out["min-recovery"] = (f"recovery >= {self.min_recovery:g}%",
                                   lambda r: _le(-_num(r["recovery_pct"]), -self.min_recovery))
        if self.max_weight_bytes is not None:
            out["max-weight-bytes"] = (f"weights <= {human_bytes(self.max_weight_bytes)}",
                                       lambda r: _le(r["weight_bytes"], self.max_weight_bytes))
        if self.max_memory is not None:
            out["max-memory"] = (f"memory <= {human_bytes(self.max_memory)}",
                                 lambda r: _le(r["memory_bytes"], self.max_memory))
        if self.max_latency_ms is not None:
            out["max-latency-ms"] = (f"tpot_p50 <= {self.max_latency_ms:g} ms",
                                     lambda r: _le(r["tpot_p50_ms"], self.max_latency_ms))
        return out


@dataclass
class Answer:
    dataset: str
    metric: str
    higher_is_better: bool
    constraints: dict[str, str]
    picks: list[dict[str, Any]]
    candidates: int
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    binding: list[str] = field(default_factory=list)
    diagnosis: list[str] = field(default_factory=list)


def recommend(con: duckdb.DuckDBPyConnection, dataset: str, budget: Budget, metric: str | None = None,
              model: str | None = None, rank: Rank = "size", top: int = 5) -> Answer:
    """The ``top`` candidates meeting ``budget``, ranked by ``rank``; see the module doc."""
    datasets = [r[0] for r in con.execute(
        "select distinct dataset from cells where status = 'ok' order by 1").fetchall()]
    if dataset not in datasets:
        raise BudgetError(f"--dataset {dataset!r}: no ok cells for it in the store; "
                          f"datasets with results: {', '.join(datasets) or 'none'}")
    if metric is None:
        metric = con.execute("select primary_metric from cells where status = 'ok' and dataset = ? "
                             "group by 1 order by count(*) desc limit 1", [dataset]).fetchone()[0]
    direction = higher_is_better(metric)
    if direction is None:
        known = [r[0] for r in con.execute(
            "select distinct m.metric from metrics m join metric_directions d using (metric) "
            "where m.dataset = ? order by 1", [dataset]).fetchall()]
        raise BudgetError(f"--metric {metric!r}: not a quality metric of {dataset}; "
                          f"available: {', '.join(known) or 'none'}")
    rel = con.execute(CANDIDATES, {"dataset": dataset, "metric": metric})
    columns = [d[0] for d in rel.description]
    rows = [dict(zip(columns, r)) for r in rel.fetchall()]
    if model is not None:
        rows = [r for r in rows if r["model"] == model]
    if not rows:
        raise BudgetError(f"--metric {metric!r}: no ok cell on {dataset} has it"
                          + (f" for model {model!r}" if model else ""))
    clean = [r for r in rows if r["anomaly"] is None]
    set_aside = [r for r in rows if r["anomaly"] is not None]
    constraints = budget.constraints()
    feasible = [r for r in clean if all(test(r) for _, test in constraints.values())]
    feasible.sort(key=_rank_key(rank))
    answer = Answer(dataset=dataset, metric=metric, higher_is_better=direction,
                    constraints={k: v[0] for k, v in constraints.items()}, picks=feasible[:top],
                    candidates=len(rows), set_aside=set_aside)
    if not feasible:
        _diagnose(answer, clean, constraints)
    return answer


def _diagnose(answer: Answer, rows: list[dict[str, Any]], constraints: dict[str, tuple[str, Any]]) -> None:
    if not rows:
        answer.diagnosis.append("every candidate was set aside for an anomaly")
        return
    for name, (description, test) in constraints.items():
        alone = sum(1 for r in rows if test(r))
        others = [r for r in rows if all(other[1](r) for n, other in constraints.items() if n != name)]
        if others:
            answer.binding.append(name)
        answer.diagnosis.append(f"--{name} ({description}): {alone} of {len(rows)} configs meet it alone; "
                                f"{len(others)} meet every other constraint"
                                + (f" (closest: {_closest(name, others)})" if others else ""))
    if not answer.binding:
        answer.diagnosis.append("no single constraint binds: relaxing any one alone leaves nothing; "
                                "several bind together")


def _closest(name: str, rows: list[dict[str, Any]]) -> str:
    key = {"max-drop": "quality_drop", "min-recovery": "recovery_pct", "max-weight-bytes": "weight_bytes",
           "max-memory": "memory_bytes", "max-latency-ms": "tpot_p50_ms"}[name]
    values = [r for r in rows if r[key] is not None]
    if not values:
        return f"no config has {key}"
    best = (max if name == "min-recovery" else min)(values, key=lambda r: r[key])
    shown = human_bytes(best[key]) if key.endswith("bytes") else f"{best[key]:.4g}"
    return f"{best['config']} at {key} = {shown}"


def evidence(row: dict[str, Any], metric: str) -> str:
    """One line: score, delta and its uncertainty, size, speed, memory."""
    parts = [f"{metric} {row['value']:.4g} (baseline {row['baseline_value']:.4g})"]
    if row["config"] != "baseline":
        drop = f"drop {row['quality_drop']:+.4g}"
        if row["delta_stderr"] is not None:
            drop += f" ± {row['delta_stderr']:.2g}"
        if row["p_value"] is not None:
            drop += f", {row['test']} p={row['p_value']:.3g} over {row['paired_n']} paired examples"
            if row["p_value_resolution"]:
                drop += f" (smallest attainable {row['p_value_resolution']:.3g})"
        parts.append(drop + f"; recovery {row['recovery_pct']:.1f}%")
    if row["weight_bytes"] is not None:
        size = f"weights {human_bytes(row['weight_bytes'])}"
        if row["bits_per_weight"] is not None:
            size += f" ({row['bits_per_weight']:.3g} bits/weight, {row['weight_change_pct']:+.1f}%)"
        parts.append(size)
    if row["tpot_p50_ms"] is not None:
        speed = f"tpot_p50 {row['tpot_p50_ms']:.3g} ms"
        if not row["speed_claim"]:
            speed += " [dequantized weights: dense-matmul speed, not a packed-kernel claim]"
        parts.append(speed)
    if row["memory_bytes"] is not None:
        parts.append(f"memory {human_bytes(row['memory_bytes'])} ({row['memory_kind']})")
    return "; ".join(parts)


def parse_bytes(text: str) -> int:
    """``170MB``, ``1.5GiB``, ``2e8`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size; use bytes or a unit: 170MB, 1.5GiB")
    return int(float(match.group(1)) * UNITS[match.group(2) or ""])


def human_bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value:g} B"


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _le(value: Any, bound: float) -> bool:
    value = _num(value)
    return math.isfinite(value) and value <= bound


def _rank_key(rank: Rank):
    def key(r: dict[str, Any]):
        size = _num(r["weight_bytes"]) if r["weight_bytes"] is not None else math.inf
        drop = _num(r["quality_drop"])
        latency = _num(r["tpot_p50_ms"]) if r["tpot_p50_ms"] is not None else math.inf
        return {"size": (size, drop, latency), "quality": (drop, size, latency),
                "latency": (latency, drop, size)}[rank] + (r["cell_id"],)
    return key
