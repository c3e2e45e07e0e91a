"""Which quantization group runs next, and whether a group's datasets spread over actors.

Pure functions over groups and expected costs: no Ray, no clock, no store (the driver reads the
store's timings and passes them in), so the same code runs in the driver, in
``bench/scheduler.py``'s simulated cluster and in unit tests.

- ``estimate`` gives each group an expected cost: the setup every actor running (part of) it
  pays (load, calibrate, quantize), and each cell's evaluation and profile. Timings of finished
  groups in the store win; otherwise a prior from the model's size, the method's capabilities
  and the dataset's sample limit, scaled by what the store says about the priors.
- ``plan`` orders the work longest first and splits a group's cells over several units when
  that shortens the expected makespan by more than the repeated work costs: each part pays the
  setup again (cheap for the baseline or RTN; the load alone when the quantized model is in the
  artifact cache, ``with_cached``), so a costly GPTQ run is repeated only to end much sooner.
- ``dispatch`` hands an idle actor its next unit, preferring the model it already holds among
  units about as long as the longest, and re-plans the queue when actors outnumber it.

A unit is a ``Group`` (same ``group_id``) holding some of the group's cells: every cell is in
exactly one unit, so splitting never loses or doubles a row.
"""

from __future__ import annotations

import heapq
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.cells import Cell, Group
from tasks.quantize.registry import get_method

# Store columns ``estimate`` reads from the rows of earlier groups
TIMING_COLUMNS = ["model_path", "method", "method_params", "group_id", "dataset_path", "limit",
                  "eval_settings", "time_load_s", "time_quantize_s", "time_evaluate_s",
                  "time_profile_s", "artifact_cache_hit"]
DEFAULT_LIMIT = 1000  # samples assumed for a dataset without a limit
# Priors in seconds per billion parameters on an A100-class GPU; only their ratios matter once
# the store holds timings (``estimate`` rescales them).
LOAD_S_PER_B = 3.0
QUANTIZE_S_PER_B = {"none": 0.0, "plain": 1.0, "calibrated": 50.0}
EVALUATE_S_PER_B_SAMPLE = 0.005
AFFINITY = 0.9  # an actor takes a unit of its held model if it is this long as the longest queued
MAKESPAN_TOLERANCE = 0.005  # plans scoring this close to the best count as equal
# split targets: the lower bound and the mean load per actor times these
SPLIT_TARGETS = (1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Costs:
    """Expected seconds: ``setup[group_id]`` once per unit of the group, ``cell[cell_id]`` per cell."""

    setup: dict[str, float]
    cell: dict[str, float]

    def of(self, unit: Group) -> float:
        return self.setup[unit.group_id] + sum(self.cell[c.cell_id] for c in unit.cells)

    def chain(self, unit: Group) -> float:
        """The least time the unit can take however it is split: setup and its longest cell."""
        return self.setup[unit.group_id] + max(self.cell[c.cell_id] for c in unit.cells)


# --- expected costs ----------------------------------------------------------------------------

def _quantize_kind(method: str, params: dict[str, Any]) -> str:
    info = get_method(method)
    if not info.in_place:
        return "none"  # the baseline: the model as loaded
    return "calibrated" if info.calibrated(params) else "plain"


def prior_setup(method: str, params: dict[str, Any], params_b: float) -> float:
    """Expected load + calibrate + quantize seconds, before any timing is known."""
    return params_b * (LOAD_S_PER_B + QUANTIZE_S_PER_B[_quantize_kind(method, params)])


def prior_cell(limit: int | None, params_b: float) -> float:
    """Expected evaluate + profile seconds of one cell, before any timing is known."""
    return params_b * EVALUATE_S_PER_B_SAMPLE * (limit or DEFAULT_LIMIT)


def _median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _dataset_key(cell: Cell) -> tuple:
    """A cell's dataset as the store's rows name it (``identity_columns``)."""
    d = cell.dataset
    return d.path, d.limit, json.dumps(d.settings, sort_keys=True)


def estimate(groups: Sequence[Group], params: dict[str, int | None],
             history: Sequence[dict[str, Any]] = ()) -> Costs:
    """Expected costs of ``groups``.

    ``params``: model path -> parameter count (None when unknown: 1B is assumed).
    ``history``: ok rows of the store (any sweep) with ``TIMING_COLUMNS``. A group's setup is
    the median load + quantize of the store's groups of the same model and method (cache hits
    left out); a cell's cost the median evaluate + profile of the store's cells of the same
    model, method and dataset (path, limit, settings), else of the same model and dataset.
    Without such rows, the prior (``prior_setup``, ``prior_cell``) times the median ratio of
    observed to prior over the rows there are of these models (1 without rows).
    """
    def size(model_path: str) -> float:
        return (params.get(model_path) or 1e9) / 1e9

    setups: dict[tuple, list[float]] = {}
    evals: dict[tuple, list[float]] = {}
    setup_ratio, eval_ratio, seen_groups = [], [], set()
    for row in history:
        model, load, quant = row["model_path"], row.get("time_load_s"), row.get("time_quantize_s")
        if row["group_id"] not in seen_groups and load is not None and quant is not None \
                and not row.get("artifact_cache_hit"):
            seen_groups.add(row["group_id"])
            setups.setdefault((model, row["method"]), []).append(load + quant)
            prior = prior_setup(row["method"], json.loads(row.get("method_params") or "{}"), size(model))
            if prior > 0:
                setup_ratio.append((load + quant) / prior)
        evaluate = row.get("time_evaluate_s")
        if evaluate is not None:
            seconds = evaluate + (row.get("time_profile_s") or 0.0)
            dataset = (row["dataset_path"], row.get("limit"), row.get("eval_settings") or "{}")
            evals.setdefault((model, row["method"], *dataset), []).append(seconds)
            evals.setdefault((model, *dataset), []).append(seconds)
            eval_ratio.append(seconds / prior_cell(row.get("limit"), size(model)))
    setup_seen = {key: _median(v) for key, v in setups.items()}
    eval_seen = {key: _median(v) for key, v in evals.items()}
    # how far the priors are off on this store's hardware
    setup_scale = _median(setup_ratio) or _median(eval_ratio) or 1.0
    eval_scale = _median(eval_ratio) or setup_scale

    setup, cell_cost = {}, {}
    for group in groups:
        head = group.head
        seen = setup_seen.get((head.model.path, head.method))
        setup[group.group_id] = seen if seen is not None else \
            setup_scale * prior_setup(head.method, head.params, size(head.model.path))
        for cell in group.cells:
            dataset = _dataset_key(cell)
            seen = eval_seen.get((cell.model.path, cell.method, *dataset))
            if seen is None:
                seen = eval_seen.get((cell.model.path, *dataset))
            cell_cost[cell.cell_id] = seen if seen is not None else \
                eval_scale * prior_cell(cell.dataset.limit, size(cell.model.path))
    return Costs(setup=setup, cell=cell_cost)


def with_cached(costs: Costs, groups: Sequence[Group], cached: set[str],
                params: dict[str, int | None]) -> Costs:
    """Costs where the quantized model of the ``cached`` groups is in the artifact cache: a
    unit of such a group pays the load alone (its share of the prior setup, scaled alike)."""
    setup = dict(costs.setup)
    for group in groups:
        if group.group_id in cached:
            head = group.head
            size = (params.get(head.model.path) or 1e9) / 1e9
            prior = prior_setup(head.method, head.params, size)
            if prior > 0:
                setup[group.group_id] = costs.setup[group.group_id] * LOAD_S_PER_B * size / prior
    return Costs(setup=setup, cell=costs.cell)


# --- planning ----------------------------------------------------------------------------------

def lower_bound(units: Sequence[Group], costs: Costs, actors: int, busy: Sequence[float] = ()) -> float:
    """No schedule of ``units`` on ``actors`` (``busy``: seconds until some are free) ends
    sooner than this: the longest chain, or all the work (each group's setup paid once) spread
    evenly."""
    if not units:
        return max(busy, default=0.0)
    setups = {u.group_id: costs.setup[u.group_id] for u in units}
    work = sum(setups.values()) + sum(costs.cell[c.cell_id] for u in units for c in u.cells)
    free = sorted(busy)[:actors] + [0.0] * max(0, actors - len(busy))
    return max(max(costs.chain(u) for u in units), (work + sum(free)) / actors)


def makespan(units: Sequence[Group], costs: Costs, actors: int, busy: Sequence[float] = ()) -> float:
    """When the last of ``units`` ends, taken in order by whichever actor is free first."""
    free = sorted(busy)[:actors] + [0.0] * max(0, actors - len(busy))
    heapq.heapify(free)
    end = max(free, default=0.0)
    for unit in units:
        start = heapq.heappop(free)
        finish = start + costs.of(unit)
        end = max(end, finish)
        heapq.heappush(free, finish)
    return end


def split(unit: Group, costs: Costs, target: float) -> list[Group]:
    """The fewest parts of ``unit`` (each paying the setup) that each fit in ``target`` seconds,
    cells dealt longest first to the lightest part; one part per cell when none fits."""
    setup = costs.setup[unit.group_id]
    if costs.of(unit) <= target or len(unit.cells) == 1:
        return [unit]
    cells = sorted(unit.cells, key=lambda c: -costs.cell[c.cell_id])
    room = target - setup
    evaluate = costs.of(unit) - setup
    parts = len(cells) if room <= 0 else min(len(cells), max(2, math.ceil(evaluate / room)))
    while True:
        bins: list[list[Cell]] = [[] for _ in range(parts)]
        loads = [(0.0, i) for i in range(parts)]
        for cell in cells:
            load, i = heapq.heappop(loads)
            bins[i].append(cell)
            heapq.heappush(loads, (load + costs.cell[cell.cell_id], i))
        if parts == len(cells) or max(load for load, _ in loads) <= room:
            break
        parts += 1
    order = {c.cell_id: i for i, c in enumerate(unit.cells)}  # the group's own cell order
    return [Group(group_id=unit.group_id, cells=tuple(sorted(b, key=lambda c: order[c.cell_id])))
            for b in bins if b]


def merge(units: Iterable[Group]) -> list[Group]:
    """One unit per group, its cells in the order met."""
    cells: dict[str, list[Cell]] = {}
    for unit in units:
        cells.setdefault(unit.group_id, []).extend(unit.cells)
    return [Group(group_id=gid, cells=tuple(members)) for gid, members in cells.items()]


def longest_first(units: Iterable[Group], costs: Costs) -> list[Group]:
    """Units by expected cost, longest first (ties: the order given)."""
    return sorted(units, key=lambda u: -costs.of(u))


def plan(units: Sequence[Group], costs: Costs, actors: int, busy: Sequence[float] = ()) -> list[Group]:
    """The queue for ``actors`` (``busy``: expected seconds until the busy ones are free).

    Units of one group are merged first, then split (``split``) at makespan targets from the
    lower bound and from the mean load per actor up. Each candidate is simulated longest first
    (``makespan``) and scored by its makespan plus its extra work (the repeated setups) spread
    over the actors: a split must save more wall time than its re-quantizing would take on the
    whole cluster. Of the candidates within 0.5 % of the best score, the one with the least sum
    of squared unit costs is kept: shorter units leave less to chance when expected costs are off.
    """
    units = merge(units)
    whole = longest_first(units, costs)
    if actors <= 1 or not units:
        return whole
    work = sum(costs.of(u) for u in units)
    mean = (work + sum(sorted(busy)[:actors])) / actors
    candidates = [whole]
    for base in (lower_bound(units, costs, actors, busy), mean):
        for factor in SPLIT_TARGETS:
            parts = (part for u in units for part in split(u, costs, base * factor))
            candidates.append(longest_first(parts, costs))
    scores = [makespan(c, costs, actors, busy) + (sum(costs.of(u) for u in c) - work) / actors
              for c in candidates]
    best = min(scores)
    near = [c for c, score in zip(candidates, scores) if score <= best * (1 + MAKESPAN_TOLERANCE)]
    return min(near, key=lambda c: (sum(costs.of(u) ** 2 for u in c), len(c)))


def dispatch(queue: list[Group], costs: Costs, idle: int, busy: Sequence[float] = (),
             held_model: str | None = None) -> Group:
    """Pop the unit an idle actor runs next from ``queue`` (kept longest first by ``plan``).

    ``idle``: actors free now (this one included); ``busy``: expected seconds left on the others.
    When actors outnumber the queue, the queue is planned again for them, so that a group's
    datasets can spread over the idle actors. Among units at least ``AFFINITY`` times as long as
    the longest, one of ``held_model`` (the model this actor has loaded) comes first.
    """
    if idle > len(queue) and any(len(u.cells) > 1 for u in queue):
        queue[:] = plan(queue, costs, idle + len(busy), busy)
    longest = costs.of(queue[0])
    if held_model is not None:
        for i, unit in enumerate(queue):
            if costs.of(unit) < AFFINITY * longest:
                break
            if unit.head.model.path == held_model:
                return queue.pop(i)
    return queue.pop(0)
