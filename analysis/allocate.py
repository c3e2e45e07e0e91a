"""Mixed precision from a finished sensitivity study: one option per unit, the least predicted
loss under a size budget, solved exactly, written as a spec that runs as a normal cell.

The prediction is an assumption, stated in every output: the KL divergence of the mixed model
from the baseline is the sum of the KL of each unit quantized alone (``sensitivity`` view,
analysis.derived), measured on one dataset of the study. It ignores how the errors of units
interact; ``baseline_deltas`` then shows the measured KL beside the predicted one.

The choice is a multiple-choice knapsack: binary ``x[u, o]``, one option per unit,
``sum x * bytes <= budget``, minimise ``sum x * KL``. It is solved as an integer program by
HiGHS (``scipy.optimize.milp``) to a zero optimality gap: an exact optimum, not a greedy pick.
Budgets: ``bits_per_weight`` over the study's units (their stored bits, scales and zeros
included, over their weights), or ``weight_bytes`` of the whole model (the parts outside the
units, as the study's rows store them, included).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from analysis.views import dicts
from orchestrator.preflight import DTYPE_BYTES

ASSUMPTION = ("predicted KL = the sum over units of the KL each unit's option gives when it is the "
              "only unit quantized (sensitivity view); interactions between units are ignored")


class AllocationError(Exception):
    """A study that cannot be allocated from, or a budget no choice meets; says what to do."""


@dataclass(frozen=True)
class Choice:
    unit: str
    pattern: str
    bits: int | None
    group_size: int | None
    kl: float
    bytes: float
    params: int


@dataclass(frozen=True)
class Allocation:
    choices: tuple[Choice, ...]
    predicted_kl: float
    unit_bytes: float  # the units' stored bytes
    unit_params: int
    budget_bytes: float  # over the units
    fixed_bytes: float  # the model's bytes outside the units

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.unit_bytes / self.unit_params

    @property
    def weight_bytes(self) -> float:
        return self.fixed_bytes + self.unit_bytes


def solve(costs: list[list[float]], losses: list[list[float]], budget: float) -> list[int]:
    """The option index per unit minimising the total loss with total cost <= ``budget``
    (exact: HiGHS branch and bound to a zero gap). Raises AllocationError when infeasible."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(c) for c in costs]
    n = sum(sizes)
    c = np.concatenate([np.asarray(loss, dtype=float) for loss in losses])
    scale = max(max(max(row) for row in costs), 1.0)  # costs of order 1: HiGHS' tolerances are absolute
    cost = np.concatenate([np.asarray(row, dtype=float) for row in costs]) / scale
    one_each = np.zeros((len(costs), n))
    start = 0
    for u, size in enumerate(sizes):
        one_each[u, start:start + size] = 1
        start += size
    constraints = [LinearConstraint(one_each, 1, 1),
                   LinearConstraint(cost[None, :], -np.inf, budget / scale + 1e-9 * len(costs))]
    result = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0, "presolve": True})
    if result.status != 0 or result.x is None:
        cheapest = sum(min(row) for row in costs)
        raise AllocationError(f"no choice of options meets the budget ({result.message}); the cheapest "
                              f"choice needs {cheapest:,.0f} against {budget:,.0f}")
    chosen, start = [], 0
    for size in sizes:
        chosen.append(int(np.argmax(result.x[start:start + size])))
        start += size
    return chosen


def study_rows(con: Any, sweep: str, model: str | None, dataset: str | None) -> tuple[list[dict], str, str]:
    """The study's unit rows for one model and the dataset whose KL drives the choice."""
    rows = dicts(con.execute("select * from sensitivity where sweep = ?", [sweep]))
    if not rows:
        known = [r[0] for r in con.execute("select distinct sweep from sensitivity order by 1").fetchall()]
        raise AllocationError(f"sweep {sweep!r} has no finished sensitivity cells in this store "
                              f"(sweeps with some: {', '.join(known) or 'none'}); run a spec with a "
                              "`sensitivity:` block first (orchestrator.sensitivity)")
    models = sorted({r["model"] for r in rows})
    if model is None and len(models) > 1:
        raise AllocationError(f"the study covers several models ({', '.join(models)}); pass --model")
    model = model or models[0]
    if model not in models:
        raise AllocationError(f"--model {model!r}: not in the study (models: {', '.join(models)})")
    rows = [r for r in rows if r["model"] == model]
    with_kl = sorted({r["dataset"] for r in rows if r["kl_divergence"] is not None})
    if not with_kl:
        raise AllocationError("no unit cell of the study has a KL divergence: KL is measured on token-"
                              "perplexity tasks (perplexity, wikitext, c4); add one to the study's datasets")
    if dataset is None and len(with_kl) > 1:
        raise AllocationError(f"KL was measured on several datasets ({', '.join(with_kl)}); pass --dataset")
    dataset = dataset or with_kl[0]
    if dataset not in with_kl:
        raise AllocationError(f"--dataset {dataset!r}: no KL there (datasets with KL: {', '.join(with_kl)})")
    kinds = sorted({r["unit_kind"] for r in rows})
    if len(kinds) > 1:
        raise AllocationError(f"the study mixes unit kinds ({', '.join(kinds)}) for {model}; units must not "
                              "overlap: keep one kind per sweep")
    methods = sorted({_base_params(r) for r in rows})
    if len(methods) > 1:
        raise AllocationError(f"the study mixes method configurations ({'; '.join(methods)}); keep one per sweep")
    return rows, model, dataset


def allocate(rows: list[dict], dataset: str, bits_per_weight: float | None = None,
             weight_bytes: float | None = None) -> Allocation:
    """The exact allocation over the study's units for one dataset's KL."""
    if (bits_per_weight is None) == (weight_bytes is None):
        raise AllocationError("give one budget: --bits-per-weight X or --weight-bytes N")
    here = [r for r in rows if r["dataset"] == dataset and r["kl_divergence"] is not None]
    by_unit: dict[str, list[dict]] = {}
    for r in here:
        by_unit.setdefault(r["pattern"], []).append(r)
    patterns = sorted(by_unit, key=lambda p: (by_unit[p][0]["block"] is None, by_unit[p][0]["block"] or 0, p))
    options = sorted({(r["bits"], r["group_size"]) for r in here}, key=lambda o: (o[0] or 0, o[1] or 0))
    missing = [f"{by_unit[p][0]['unit']}: {', '.join(option_label(o) for o in options if o not in {(r['bits'], r['group_size']) for r in by_unit[p]})}"
               for p in patterns if len({(r["bits"], r["group_size"]) for r in by_unit[p]}) < len(options)]
    if missing:
        raise AllocationError("the study is not finished: units without an ok cell for an option ("
                              + "; ".join(missing[:8]) + (f"; {len(missing) - 8} more" if len(missing) > 8 else "")
                              + "); run the study's spec again (finished cells are kept)")
    params = {p: by_unit[p][0]["unit_params"] for p in patterns}
    unit_params = sum(params.values())
    fixed = _fixed_bytes(here, params)
    if bits_per_weight is not None:
        budget = bits_per_weight * unit_params / 8
    else:
        budget = weight_bytes - fixed
    costs = [[r["unit_bytes"] for r in _by_option(by_unit[p], options)] for p in patterns]
    losses = [[max(r["kl_divergence"], 0.0) for r in _by_option(by_unit[p], options)] for p in patterns]
    chosen = solve(costs, losses, budget)
    choices = []
    for p, index in zip(patterns, chosen):
        r = _by_option(by_unit[p], options)[index]
        choices.append(Choice(unit=r["unit"], pattern=p, bits=r["bits"], group_size=r["group_size"],
                              kl=r["kl_divergence"], bytes=r["unit_bytes"], params=params[p]))
    return Allocation(choices=tuple(choices), predicted_kl=sum(c.kl for c in choices),
                      unit_bytes=sum(c.bytes for c in choices), unit_params=unit_params,
                      budget_bytes=budget, fixed_bytes=fixed)


def uniform_predictions(rows: list[dict], dataset: str) -> list[dict]:
    """Each option given to every unit: its predicted KL and bits per weight (the points a
    mixed allocation sits between)."""
    here = [r for r in rows if r["dataset"] == dataset and r["kl_divergence"] is not None]
    out = []
    for option in sorted({(r["bits"], r["group_size"]) for r in here}, key=lambda o: (o[0] or 0, o[1] or 0)):
        chosen = [r for r in here if (r["bits"], r["group_size"]) == option]
        params = sum(r["unit_params"] for r in chosen)
        out.append({"option": option_label(option), "bits": option[0], "group_size": option[1],
                    "predicted_kl": sum(r["kl_divergence"] for r in chosen),
                    "bits_per_weight": 8 * sum(r["unit_bytes"] for r in chosen) / params})
    return out


def mixed_spec(allocation: Allocation, study: dict[str, Any], name: str) -> dict[str, Any]:
    """The spec of the allocated configuration: the study's model, method and datasets; the
    option most units take as the method's bits and group size, the others as overrides."""
    counts = Counter((c.bits, c.group_size) for c in allocation.choices)
    bits, group_size = counts.most_common(1)[0][0]
    overrides = [{"pattern": c.pattern, "bits": c.bits, "group_size": c.group_size}
                 for c in allocation.choices if (c.bits, c.group_size) != (bits, group_size)]
    method = {"name": study["method"], **study["params"]}
    if overrides:
        method["overrides"] = overrides
    if bits is not None:
        method["bits"] = [bits]
    if group_size is not None:
        method["group_sizes"] = [group_size]
    spec = {"name": name, "models": [study["model"]], "methods": [method], "datasets": study["datasets"],
            "seed": study["seed"]}
    if study.get("calibration"):
        spec["calibration"] = study["calibration"]
    return spec


def study_context(con: Any, sweep: str, model: str, any_cell: str) -> dict[str, Any]:
    """The model entry, method, datasets, calibration and seed of a study, from its rows."""
    (row,) = dicts(con.execute("""select model, model_path, model_revision, dtype, method, method_params,
                                          calibration, seed from cells where cell_id = ?""", [any_cell]))
    model = {"name": row["model"], "path": row["model_path"], "dtype": row["dtype"]}
    if model["path"].startswith("known:"):
        model.pop("path")
    if row["model_revision"]:
        model["revision"] = row["model_revision"]
    datasets = []
    for d in dicts(con.execute("""select distinct dataset, task, dataset_path, "limit", eval_settings from cells
                                    where sweep = ? and model = ? and status = 'ok' order by dataset""",
                                [sweep, model["name"]])):
        entry = {"name": d["dataset"], "task": d["task"], "path": d["dataset_path"]}
        if d["limit"] is not None:
            entry["limit"] = d["limit"]
        entry.update(json.loads(d["eval_settings"] or "{}"))
        if entry not in datasets:
            datasets.append(entry)
    params = {k: v for k, v in json.loads(row["method_params"]).items() if k != "overrides"}
    return {"model": model, "method": row["method"], "params": params, "datasets": datasets,
            "calibration": json.loads(row["calibration"]) if row["calibration"] else None, "seed": row["seed"]}


def allocation_id(sweep: str, model: str, dataset: str, budget: dict[str, float], spec: dict[str, Any]) -> str:
    payload = json.dumps({"study": sweep, "model": model, "dataset": dataset, "budget": budget, "spec": spec},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def predictions(allocation: Allocation, rows: list[dict], cells: list[Any]) -> dict[str, float | None]:
    """Per cell of the written spec: the predicted KL on its dataset (the sum of the chosen
    options' unit KL there), or None where the study measured no KL on that dataset."""
    kl = {(r["dataset"], r["pattern"], r["bits"], r["group_size"]): r["kl_divergence"] for r in rows}
    out = {}
    for cell in cells:
        values = [kl.get((cell.dataset.name, c.pattern, c.bits, c.group_size)) for c in allocation.choices]
        out[cell.cell_id] = None if any(v is None for v in values) else sum(values)
    return out


def _fixed_bytes(rows: list[dict], params: dict[str, int]) -> float:
    """Bytes of the model outside the units: a unit cell's whole-model bytes, less its own unit
    as stored and the other units at the dtype they are kept in."""
    r = rows[0]
    per_weight = DTYPE_BYTES.get(r.get("dtype") or "", 4)
    others = sum(n for p, n in params.items() if p != r["pattern"])
    return r["weight_bytes"] - r["unit_bytes"] - others * per_weight


def _by_option(rows: list[dict], options: list[tuple]) -> list[dict]:
    by = {(r["bits"], r["group_size"]): r for r in rows}
    return [by[o] for o in options]


def _base_params(row: dict) -> str:
    params = {k: v for k, v in json.loads(row["method_params"]).items() if k != "overrides"}
    return f"{row['method']} {json.dumps(params, sort_keys=True)}"


def option_label(option: tuple) -> str:
    bits, group = option
    return " ".join(p for p in (f"w{bits}" if bits is not None else "", f"g{group}" if group is not None else "") if p)
