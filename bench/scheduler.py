"""The scheduler alone, on a SIMULATED cluster: makespan against the lower bound.

```bash
python bench/scheduler.py            # 16 logical GPUs, the grids below
python bench/scheduler.py --gpus 8 --noise 0.5
```

No Ray, no GPU, no model: an event-driven simulation of the driver's loop, where a worker takes
a known time per group (load + quantize, paid by each unit of a group) and per cell (evaluate +
profile). Cells come from real specs (``orchestrator.spec`` + ``orchestrator.cells``), so group
ids, cell ids and the first-seen order are the driver's own. Two policies:

- ``first-seen``: today's driver before ``orchestrator.schedule``: groups in ``group_cells``
  order, whole, an idle actor preferring a group of the model it holds;
- ``schedule``: ``orchestrator.schedule.plan`` once, then ``dispatch`` at each idle actor, the
  same calls the driver makes, with the same expected-time-left of the busy actors.

The scheduler sees expected costs: the true ones, or the true ones times a lognormal error
(``--noise``, seeded), as when the store's timings of similar groups are off. The lower bound is
max(longest chain: one group's setup + its longest cell, total work with each setup paid once /
GPUs); no schedule beats it.
"""

from __future__ import annotations

import argparse
import heapq
import random
import time

from orchestrator import schedule
from orchestrator.cells import Group, expand, group_cells
from orchestrator.spec import parse_spec

# seconds, A100-class, per billion parameters: load, and quantize by method
LOAD_S_PER_B = 3.0
QUANTIZE_S_PER_B = {"baseline": 0.0, "rtn": 0.5, "gsq": 4.0, "awq": 40.0, "gptq": 60.0}
# evaluate + profile seconds per billion parameters, by dataset
EVALUATE_S_PER_B = {"boolq": 3.0, "gsm8k": 12.0, "msmarco": 5.0, "wikitext": 2.0,
                    "mmlu": 8.0, "hellaswag": 4.0, "arc": 1.5, "piqa": 1.0}
MODEL_B = {"1b": 1.2, "8b": 8.0, "70b": 70.0, "3b": 3.2}
DATASETS4 = [{"name": n, "task": "perplexity", "path": f"/data/{n}.txt"}
             for n in ("boolq", "gsm8k", "msmarco", "wikitext")]
DATASETS8 = [{"name": n, "task": "perplexity", "path": f"/data/{n}.txt"} for n in EVALUATE_S_PER_B]
CALIBRATION = {"dataset": "/data/calib.txt", "samples": 128, "seq_len": 2048}


def grids() -> dict[str, dict]:
    return {
        # 3 models x {baseline, rtn, gptq, awq, gsq} x bits {3, 4} x group sizes {32, 64, 128} x 4 datasets
        "realistic: 1B/8B/70B x rtn/gptq/awq/gsq x 2 bits x 3 group sizes x 4 datasets (+baselines)": {
            "name": "realistic",
            "models": [{"name": m, "path": f"/models/{m}"} for m in ("1b", "8b", "70b")],
            "methods": [{"name": "baseline"}, {"name": "rtn"}, {"name": "gptq"}, {"name": "awq"},
                        {"name": "gsq"}],
            "bits": [3, 4], "group_sizes": [32, 64, 128], "datasets": DATASETS4,
            "calibration": CALIBRATION},
        # fewer groups than GPUs, each long: 70B baseline and RTN on 8 datasets beside small GPTQ
        "skewed: 70B baseline + rtn (4 groups) x 8 datasets, 1B gptq/gsq (8 groups) x 8 datasets": {
            "name": "skewed",
            "models": [{"name": "70b", "path": "/models/70b"}, {"name": "1b", "path": "/models/1b"}],
            "methods": [{"name": "baseline"}, {"name": "rtn", "bits": [4, 8], "group_sizes": [64, 128],
                                               "sym": [True]},
                        {"name": "gptq", "bits": [4], "group_sizes": [32, 64, 128, -1]},
                        {"name": "gsq", "bits": [4], "group_sizes": [32, 64, 128, -1]}],
            "bits": [4], "group_sizes": [64], "datasets": DATASETS8, "calibration": CALIBRATION,
            "exclude": [{"model": ["70b"], "method": ["gptq", "gsq"]},
                        {"model": ["1b"], "method": ["baseline", "rtn"]}]},
        # a typical 8B study: one model, many configs, 4 datasets
        "one 8B model x rtn/gptq/awq/gsq x bits {2,3,4,8} x group sizes {32,64,128} x 4 datasets": {
            "name": "one-model",
            "models": [{"name": "8b", "path": "/models/8b"}],
            "methods": [{"name": "baseline"}, {"name": "rtn"}, {"name": "gptq"}, {"name": "awq"},
                        {"name": "gsq", "bits": [4, 8]}],
            "bits": [2, 3, 4, 8], "group_sizes": [32, 64, 128], "datasets": DATASETS4,
            "calibration": CALIBRATION},
    }


def true_costs(groups: list[Group]) -> schedule.Costs:
    setup, cell = {}, {}
    for group in groups:
        head = group.head
        size = MODEL_B[head.model.name]
        setup[group.group_id] = size * (LOAD_S_PER_B + QUANTIZE_S_PER_B[head.method])
        for c in group.cells:
            cell[c.cell_id] = size * EVALUATE_S_PER_B[c.dataset.name]
    return schedule.Costs(setup=setup, cell=cell)


def noisy(groups: list[Group], costs: schedule.Costs, sigma: float, seed: int,
          correlated: bool) -> schedule.Costs:
    """``costs`` times a lognormal error: one per (model, method) for setups and one per
    (model, dataset) for cells when ``correlated`` (what ``schedule.estimate`` keys the store's
    timings by, so its errors are shared alike), else one per group and per cell."""
    if sigma <= 0:
        return costs
    rng = random.Random(seed)
    errors: dict = {}

    def error(key: tuple) -> float:
        if key not in errors:
            errors[key] = rng.lognormvariate(0, sigma)
        return errors[key]

    setup, cell = {}, {}
    for group in groups:
        head = group.head
        key = (head.model.path, head.method) if correlated else (group.group_id,)
        setup[group.group_id] = costs.setup[group.group_id] * error(key)
        for c in group.cells:
            key = (c.model.path, c.dataset.path) if correlated else (c.cell_id,)
            cell[c.cell_id] = costs.cell[c.cell_id] * error(key)
    return schedule.Costs(setup=setup, cell=cell)


def first_seen(queue: list[Group], held_model: str | None) -> Group:
    """The driver's pick before orchestrator.schedule: the first group of the held model, else
    the first group."""
    for i, group in enumerate(queue):
        if group.head.model.path == held_model:
            return queue.pop(i)
    return queue.pop(0)


def simulate(groups: list[Group], truth: schedule.Costs, seen: schedule.Costs, gpus: int,
             policy: str) -> tuple[float, float, int, set[str]]:
    """(makespan, GPU-seconds used, units run, cell ids run) of one policy."""
    queue = schedule.plan(groups, seen, gpus) if policy == "schedule" else list(groups)
    idle = list(range(gpus))
    held: dict[int, str] = {}
    running: list[tuple[float, int, float, float]] = []  # (finish, actor, start, expected)
    now = busy_s = 0.0
    units, ran = 0, []
    while queue or running:
        while idle and queue:
            actor = idle.pop()
            if policy == "schedule":
                left = [max(0.0, expected - (now - start)) for _, _, start, expected in running]
                unit = schedule.dispatch(queue, seen, len(idle) + 1, left, held.get(actor))
            else:
                unit = first_seen(queue, held.get(actor))
            held[actor] = unit.head.model.path
            took = truth.of(unit)
            busy_s += took
            units += 1
            ran += [c.cell_id for c in unit.cells]
            heapq.heappush(running, (now + took, actor, now, seen.of(unit)))
        now, actor, _, _ = heapq.heappop(running)
        idle.append(actor)
        while running and running[0][0] <= now:  # every actor free at this instant
            idle.append(heapq.heappop(running)[1])
    assert len(ran) == len(set(ran)), "a cell ran twice"
    return now, busy_s, units, set(ran)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=16)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.3],
                        help="lognormal sigmas of the scheduler's cost error, besides exact costs; "
                        "each shared by similar groups and drawn per group (default: 0.3)")
    parser.add_argument("--seeds", type=int, default=5, help="noise draws per level")
    args = parser.parse_args()
    print(f"SIMULATION: {args.gpus} logical GPUs, event-driven, a worker of known per-group and "
          "per-cell cost (no Ray, no GPU, no model)")
    for title, raw in grids().items():
        groups = group_cells(expand(parse_spec(raw)))
        truth = true_costs(groups)
        cells = {c.cell_id for g in groups for c in g.cells}
        bound = schedule.lower_bound(groups, truth, args.gpus)
        work = sum(truth.of(g) for g in groups)
        chain = max(truth.chain(g) for g in groups)
        print(f"\n{title}\n  {len(groups)} groups, {len(cells)} cells; work {work / 3600:.1f} GPU-h, "
              f"longest chain {chain / 3600:.2f} h, lower bound {bound / 3600:.2f} h")
        print(f"  {'policy':<11} {'error':>12} {'makespan h':>10} {'bound/makespan':>14} "
              f"{'GPU-h used':>10} {'units':>5} {'sim ms':>7}")
        levels = [(0.0, False)] + [(s, c) for s in args.noise if s > 0 for c in (True, False)]
        for sigma, correlated in levels:
            label = "exact" if not sigma else f"{sigma:.2f} {'shared' if correlated else 'each'}"
            for policy in ("first-seen", "schedule"):
                ends, used, count, plan_ms = [], [], [], []
                for seed in range(args.seeds if sigma > 0 else 1):
                    seen = noisy(groups, truth, sigma, seed, correlated)
                    started = time.perf_counter()
                    end, busy_s, units, ran = simulate(groups, truth, seen, args.gpus, policy)
                    plan_ms.append((time.perf_counter() - started) * 1000)
                    assert ran == cells, "a cell did not run"
                    ends.append(end)
                    used.append(busy_s)
                    count.append(units)
                mean = sum(ends) / len(ends)
                worst = max(ends)
                spread = f" (worst {bound / worst:.1%})" if len(ends) > 1 else ""
                print(f"  {policy:<11} {label:>12} {mean / 3600:>10.2f} {bound / mean:>14.1%}"
                      f" {sum(used) / len(used) / 3600:>10.1f} {round(sum(count) / len(count)):>5}"
                      f" {sum(plan_ms) / len(plan_ms):>7.0f}{spread}")


if __name__ == "__main__":
    main()
