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

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import duckdb

from analysis.quality import higher_is_better
from analysis.views import dicts

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
    select b.model, 'baseline', b.cell_id, b.method, b.bits, b.group_size, b.m.value, b.m.value, 0, 0, 100,
           null, null, null, null, null, b.weight_bytes, b.bits_per_weight, 0, b.memory_bytes, b.memory_kind,
           b.tpot_p50_ms, b.kernel, coalesce(b.kernel not in ('dequantized', 'decompressed'), false),
           case when not coalesce(isfinite(b.m.value), false) then 'non-finite metric' end
    from (select *, unnest(metrics) as m from baseline_rows where dataset = $dataset) b
    where b.m.metric = $metric
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

    def constraints(self) -> dict[str, Constraint]:
        """name -> the constraint as SQL over a candidate row (a value that is null or not
        finite never meets a bound)."""
        out: dict[str, Constraint] = {}
        if self.max_drop is not None:
            if self.max_drop_relative:
                out["max-drop"] = Constraint(f"drop <= {self.max_drop:g}% of the baseline",
                                             "relative_drop_pct", self.max_drop)
            else:
                out["max-drop"] = Constraint(f"drop <= {self.max_drop:g}", "quality_drop", self.max_drop)
        if self.min_recovery is not None:
            out["min-recovery"] = Constraint(f"recovery >= {self.min_recovery:g}%", "recovery_pct",
                                             self.min_recovery, at_least=True)
        if self.max_weight_bytes is not None:
            out["max-weight-bytes"] = Constraint(f"weights <= {human_bytes(self.max_weight_bytes)}",
                                                 "weight_bytes", self.max_weight_bytes)
        if self.max_memory is not None:
            out["max-memory"] = Constraint(f"memory <= {human_bytes(self.max_memory)}", "memory_bytes",
                                           self.max_memory)
        if self.max_latency_ms is not None:
            out["max-latency-ms"] = Constraint(f"tpot_p50 <= {self.max_latency_ms:g} ms", "tpot_p50_ms",
                                               self.max_latency_ms)
        return out


@dataclass(frozen=True)
class Constraint:
    description: str
    column: str  # a column of CANDIDATES
    bound: float
    at_least: bool = False  # column >= bound (else <=)

    def sql(self) -> str:
        op = ">=" if self.at_least else "<="
        return (f"coalesce(isfinite({self.column}::double) and {self.column} {op} "
                f"{float(self.bound)!r}::double, false)")


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
    # one pass over the cells: each dataset's primary metrics and how many cells have each
    summary = con.execute("select dataset, primary_metric, count(*) from cells where status = 'ok' "
                          "group by all").fetchall()
    datasets = sorted({row[0] for row in summary})
    if dataset not in datasets:
        raise BudgetError(f"--dataset {dataset!r}: no ok cells for it in the store; "
                          f"datasets with results: {', '.join(datasets) or 'none'}")
    if metric is None:
        metric = max((n, m) for d, m, n in summary if d == dataset)[1]
    direction = higher_is_better(metric)
    if direction is None:
        known = [r[0] for r in con.execute(
            "select distinct m.metric from metrics m join metric_directions d using (metric) "
            "where m.dataset = ? order by 1", [dataset]).fetchall()]
        raise BudgetError(f"--metric {metric!r}: not a quality metric of {dataset}; "
                          f"available: {', '.join(known) or 'none'}")
    params: dict[str, Any] = {"dataset": dataset, "metric": metric}
    where = ""
    if model is not None:
        where, params["model"] = "where model = $model", model
    # the candidates once (one dataset's rows of baseline_deltas), then every question on them
    rows = con.sql(f"select * from ({CANDIDATES}) {where}", params=params).to_arrow_table()
    if not rows.num_rows:
        raise BudgetError(f"--metric {metric!r}: no ok cell on {dataset} has it"
                          + (f" for model {model!r}" if model else ""))
    source = "recommend_candidates"
    con.register(source, rows)
    try:
        constraints = budget.constraints()
        meets_all = " and ".join(["anomaly is null"] + [c.sql() for c in constraints.values()])
        picks = dicts(con.execute(f"select * from {source} where {meets_all} "
                                  f"order by {RANK_ORDER[rank]}, cell_id limit {int(top)}"))
        set_aside = dicts(con.execute(f"select * from {source} where anomaly is not null order by model, cell_id"))
        answer = Answer(dataset=dataset, metric=metric, higher_is_better=direction,
                        constraints={k: c.description for k, c in constraints.items()}, picks=picks,
                        candidates=rows.num_rows, set_aside=set_aside)
        if not picks:
            _diagnose(con, answer, source, constraints)
    finally:
        con.unregister(source)
    return answer


# ORDER BY of each ranking: a missing size or latency ranks last
RANK_ORDER = {"size": "weight_bytes nulls last, quality_drop nulls last, tpot_p50_ms nulls last",
              "quality": "quality_drop nulls last, weight_bytes nulls last, tpot_p50_ms nulls last",
              "latency": "tpot_p50_ms nulls last, quality_drop nulls last, weight_bytes nulls last"}


def _diagnose(con: duckdb.DuckDBPyConnection, answer: Answer, source: str,
              constraints: dict[str, Constraint]) -> None:
    """Which constraint binds: per constraint, how many clean configs meet it alone, how many
    meet every other one (and the closest of those); one aggregate over the candidates."""
    parts = ["count(*) as clean"]
    for i, (name, c) in enumerate(constraints.items()):
        others = " and ".join(o.sql() for n, o in constraints.items() if n != name) or "true"
        pick = "arg_max" if c.at_least else "arg_min"
        parts += [f"count(*) filter (where {c.sql()}) as alone_{i}",
                  f"count(*) filter (where {others}) as others_{i}",
                  (f"{pick}({{'config': config, 'value': {c.column}}}, {c.column}) "
                   f"filter (where {others} and {c.column} is not null) as closest_{i}")]
    row = dicts(con.execute(f"select {', '.join(parts)} from {source} where anomaly is null"))[0]
    if not row["clean"]:
        answer.diagnosis.append("every candidate was set aside for an anomaly")
        return
    for i, (name, c) in enumerate(constraints.items()):
        others = row[f"others_{i}"]
        if others:
            answer.binding.append(name)
        closest = row[f"closest_{i}"]
        if others and closest is None:
            shown = f" (closest: no config has {c.column})"
        elif others:
            value = closest["value"]
            shown = f" (closest: {closest['config']} at {c.column} = " + (
                human_bytes(value) if c.column.endswith("bytes") else f"{value:.4g}") + ")"
        else:
            shown = ""
        answer.diagnosis.append(f"--{name} ({c.description}): {row[f'alone_{i}']} of {row['clean']} configs "
                                f"meet it alone; {others} meet every other constraint{shown}")
    if not answer.binding:
        answer.diagnosis.append("no single constraint binds: relaxing any one alone leaves nothing; "
                                "several bind together")


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
