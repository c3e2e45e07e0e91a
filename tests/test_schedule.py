"""orchestrator.schedule: expected costs, longest first, splitting a group over idle actors."""

from __future__ import annotations

import json
import random

import pytest

from orchestrator import schedule
from orchestrator.cells import Group, expand, group_cells
from orchestrator.driver import cached_groups
from orchestrator.spec import parse_spec

DATASETS = [{"name": n, "task": "perplexity", "path": f"/d/{n}.txt", "limit": 100} for n in "abcd"]
SPEC = {
    "name": "s",
    "models": [{"name": "small", "path": "/models/small"}, {"name": "big", "path": "/models/big"}],
    "methods": [{"name": "baseline"}, {"name": "rtn"}, {"name": "gptq"}],
    "bits": [4], "group_sizes": [64, 128], "datasets": DATASETS,
    "calibration": {"dataset": "/d/calib.txt", "samples": 8, "seq_len": 128},
}
PARAMS = {"/models/small": 1_000_000_000, "/models/big": 70_000_000_000}


def groups_of(raw: dict) -> list[Group]:
    return group_cells(expand(parse_spec(raw)))


def cells_of(units: list[Group]) -> list[str]:
    return sorted(c.cell_id for u in units for c in u.cells)


def by_key(groups: list[Group]) -> dict[tuple, Group]:
    return {(g.head.model.name, g.head.method, g.head.group_size): g for g in groups}


def test_priors_grow_with_model_size_method_and_datasets():
    groups = groups_of(SPEC)
    costs = schedule.estimate(groups, PARAMS)
    g = by_key(groups)
    assert costs.of(g["big", "rtn", 64]) > 10 * costs.of(g["small", "rtn", 64])
    # the baseline loads only; rtn rounds; gptq calibrates and solves
    assert costs.setup[g["small", "baseline", None].group_id] < costs.setup[g["small", "rtn", 64].group_id] \
        < costs.setup[g["small", "gptq", 64].group_id]
    fewer = groups_of({**SPEC, "datasets": DATASETS[:2]})
    assert schedule.estimate(fewer, PARAMS).of(by_key(fewer)["big", "gptq", 64]) < costs.of(g["big", "gptq", 64])
    # an unknown size counts as 1B, never as nothing
    unknown = schedule.estimate(groups, {})
    assert unknown.of(g["big", "rtn", 64]) == pytest.approx(costs.of(g["small", "rtn", 64]))


def test_store_timings_win_and_rescale_the_priors_of_the_rest():
    groups = groups_of(SPEC)
    g = by_key(groups)
    observed = g["small", "rtn", 64]
    history = [{"model_path": "/models/small", "method": "rtn", "group_id": "old-group",
                "dataset_path": c.dataset.path, "limit": c.dataset.limit,
                "eval_settings": json.dumps(c.dataset.settings, sort_keys=True), "time_load_s": 6.0,
                "time_quantize_s": 4.0, "time_evaluate_s": 30.0, "time_profile_s": 2.0,
                "artifact_cache_hit": False} for c in observed.cells]
    prior = schedule.estimate(groups, PARAMS)
    costs = schedule.estimate(groups, PARAMS, history)
    assert costs.setup[observed.group_id] == 10.0  # the same model and method: its median
    assert costs.setup[g["small", "rtn", 128].group_id] == 10.0
    assert all(costs.cell[c.cell_id] == 32.0 for c in observed.cells)
    # the big model has no rows: its priors, scaled by what the small one's rows said of theirs
    big = g["big", "gptq", 64]
    setup_scale = 10.0 / prior.setup[observed.group_id]
    assert costs.setup[big.group_id] == pytest.approx(prior.setup[big.group_id] * setup_scale)
    eval_scale = 32.0 / prior.cell[observed.cells[0].cell_id]
    assert costs.cell[big.cells[0].cell_id] == pytest.approx(prior.cell[big.cells[0].cell_id] * eval_scale)
    # a cache hit's quantize time (0) says nothing of the method's cost
    hits = [dict(row, group_id="other", time_quantize_s=0.0, artifact_cache_hit=True) for row in history]
    assert schedule.estimate(groups, PARAMS, hits).setup[observed.group_id] == pytest.approx(
        prior.setup[observed.group_id] * 32.0 / prior.cell[observed.cells[0].cell_id])


def test_longest_group_first():
    groups = groups_of(SPEC)
    costs = schedule.estimate(groups, PARAMS)
    queue = schedule.plan(groups, costs, actors=1)
    assert [costs.of(u) for u in queue] == sorted((costs.of(g) for g in groups), reverse=True)
    assert queue[0].head.model.name == "big" and queue[0].head.method == "gptq"
    assert len(queue) == len(groups)  # one actor: nothing to gain by splitting


def test_cheap_groups_spread_over_idle_actors_and_every_cell_is_in_one_unit():
    # two groups whose setup is short beside their evaluations, eight actors
    raw = {**SPEC, "models": SPEC["models"][1:], "methods": [{"name": "baseline"}, {"name": "rtn"}],
           "group_sizes": [64]}
    groups = groups_of(raw)
    costs = schedule.Costs(setup={g.group_id: 10.0 for g in groups},
                           cell={c.cell_id: 100.0 for g in groups for c in g.cells})
    queue = schedule.plan(groups, costs, actors=8)
    assert len(queue) == 8 and all(len(u.cells) == 1 for u in queue)
    assert cells_of(queue) == cells_of(groups)
    assert schedule.makespan(queue, costs, 8) == 110.0 == schedule.lower_bound(groups, costs, 8)
    # the parts keep their group's id: the worker quantizes for it, rows carry it
    assert {u.group_id for u in queue} == {g.group_id for g in groups}


def test_a_costly_setup_is_not_repeated_for_nothing():
    groups = groups_of({**SPEC, "models": SPEC["models"][1:], "methods": [{"name": "gptq"}],
                        "group_sizes": [64]})
    costs = schedule.Costs(setup={g.group_id: 1000.0 for g in groups},
                           cell={c.cell_id: 10.0 for g in groups for c in g.cells})
    assert schedule.plan(groups, costs, actors=4) == groups


def test_split_fits_the_target_with_the_fewest_parts():
    (group,) = groups_of({**SPEC, "models": SPEC["models"][:1], "methods": [{"name": "rtn"}],
                          "group_sizes": [64]})
    ids = [c.cell_id for c in group.cells]
    costs = schedule.Costs(setup={group.group_id: 5.0},
                           cell={ids[0]: 40.0, ids[1]: 30.0, ids[2]: 20.0, ids[3]: 10.0})
    assert schedule.split(group, costs, target=200.0) == [group]
    parts = schedule.split(group, costs, target=55.0)  # 40+10 and 30+20, each + 5
    assert len(parts) == 2 and sorted(costs.of(p) for p in parts) == [55.0, 55.0]
    assert cells_of(parts) == sorted(ids)
    for part in parts:  # the group's own cell order inside each part
        assert [c.cell_id for c in part.cells] == [i for i in ids if i in {c.cell_id for c in part.cells}]
    assert len(schedule.split(group, costs, target=1.0)) == 4  # nothing fits: a part per cell


def test_dispatch_replans_when_actors_outnumber_the_queue():
    (group,) = groups_of({**SPEC, "models": SPEC["models"][:1], "methods": [{"name": "baseline"}]})
    costs = schedule.Costs(setup={group.group_id: 1.0}, cell={c.cell_id: 50.0 for c in group.cells})
    queue = [group]
    first = schedule.dispatch(queue, costs, idle=4)
    assert len(first.cells) == 1 and len(queue) == 3
    # one actor free, three busy for a long while: no reason to split what is left
    queue = [group]
    assert schedule.dispatch(queue, costs, idle=1, busy=[1000.0, 1000.0, 1000.0]) == group and not queue


def test_dispatch_prefers_the_held_model_among_the_longest_only():
    groups = groups_of(SPEC)
    g = by_key(groups)
    a, b, c = g["big", "gptq", 64], g["small", "gptq", 64], g["small", "rtn", 64]
    costs = schedule.Costs(setup={a.group_id: 100.0, b.group_id: 95.0, c.group_id: 10.0},
                           cell={x.cell_id: 1.0 for u in (a, b, c) for x in u.cells})
    queue = [a, b, c]
    assert schedule.dispatch(queue, costs, idle=1, busy=[50.0] * 8, held_model="/models/small") == b
    queue = [a, c]  # the small model's group is far shorter: the longest goes first anyway
    assert schedule.dispatch(queue, costs, idle=1, busy=[50.0] * 8, held_model="/models/small") == a


def test_a_cached_quantized_model_makes_a_group_cheap_to_split():
    (group,) = groups_of({**SPEC, "models": SPEC["models"][1:], "methods": [{"name": "gptq"}],
                          "group_sizes": [64]})
    costs = schedule.estimate([group], PARAMS)
    cached = schedule.with_cached(costs, [group], {group.group_id}, PARAMS)
    assert cached.setup[group.group_id] < costs.setup[group.group_id] / 10
    assert len(schedule.plan([group], costs, actors=4)) < len(schedule.plan([group], cached, actors=4))


def test_cached_groups_reads_the_cache_folder(tmp_path):
    (tmp_path / "abc123-cuda").mkdir()
    (tmp_path / "abc123-cuda" / "report.pt").write_bytes(b"")
    (tmp_path / "half-cpu").mkdir()  # no report: not an entry
    (tmp_path / ".staging-cpu").mkdir()
    assert cached_groups(str(tmp_path)) == {"abc123"}
    assert cached_groups(None) == set() and cached_groups(str(tmp_path / "none")) == set()


@pytest.mark.parametrize("seed", range(20))
def test_random_plans_keep_every_cell_once_and_beat_no_bound(seed):
    rng = random.Random(seed)
    raw = {**SPEC, "datasets": DATASETS[:rng.randint(1, 4)]}
    groups = groups_of(raw)
    costs = schedule.Costs(setup={g.group_id: rng.expovariate(1 / 50) for g in groups},
                           cell={c.cell_id: rng.expovariate(1 / 30) for g in groups for c in g.cells})
    actors = rng.randint(1, 24)
    busy = [rng.uniform(0, 100) for _ in range(rng.randint(0, 3))]
    queue = schedule.plan(groups, costs, actors, busy)
    assert cells_of(queue) == cells_of(groups)
    end = schedule.makespan(queue, costs, actors, busy)
    assert schedule.lower_bound(groups, costs, actors, busy) <= end + 1e-9
    assert end <= schedule.makespan(schedule.longest_first(groups, costs), costs, actors, busy) + 1e-9
    # dispatching the whole queue hands out every cell once
    handed = []
    while queue:
        handed.append(schedule.dispatch(queue, costs, idle=rng.randint(1, actors), busy=busy))
    assert cells_of(handed) == cells_of(groups)


def test_an_evaluation_timed_with_the_same_method_wins_over_the_models_other_methods():
    groups = groups_of(SPEC)
    g = by_key(groups)
    cell = g["small", "gptq", 64].cells[0]
    row = {"model_path": "/models/small", "group_id": "x", "dataset_path": cell.dataset.path,
           "limit": cell.dataset.limit, "eval_settings": json.dumps(cell.dataset.settings, sort_keys=True),
           "time_load_s": None, "time_quantize_s": None, "time_profile_s": 0.0}
    history = [{**row, "method": "gptq", "time_evaluate_s": 90.0},  # packed kernels: slower
               {**row, "method": "rtn", "time_evaluate_s": 30.0}]
    costs = schedule.estimate(groups, PARAMS, history)
    assert costs.cell[cell.cell_id] == 90.0
    assert costs.cell[g["small", "rtn", 64].cells[0].cell_id] == 30.0
    assert costs.cell[g["small", "baseline", None].cells[0].cell_id] == 60.0  # the model's median


def test_the_driver_expects_costs_from_the_stores_rows_of_any_sweep(tmp_path):
    from orchestrator.cells import identity_columns
    from orchestrator.driver import Plan, SweepRun
    from orchestrator.store import Store

    spec = parse_spec(SPEC)
    groups = group_cells(expand(spec))
    done = by_key(groups)["small", "rtn", 64]
    store = Store(tmp_path)
    rows = [{**identity_columns(c), "sweep": "earlier", "status": "ok", "attempts": 1,
             "time_load_s": 2.0, "time_quantize_s": 3.0, "time_evaluate_s": 7.0, "time_profile_s": 1.0,
             "run_id": "r", "write_generation": 1, "write_seq": i} for i, c in enumerate(done.cells)]
    rows.append({**rows[0], "cell_id": "f" * 24, "group_id": "g" * 24, "status": "failed",
                 "time_load_s": 1000.0, "write_seq": 9})
    store.write_rows(rows)
    sweep = SweepRun(spec, store, lease=None, progress=False)
    sweep.plan = Plan(cells=[], done=set(), skipped={}, notes={}, facts={})
    costs = sweep.expected_costs(groups)
    assert costs.setup[by_key(groups)["small", "rtn", 128].group_id] == 5.0  # failed rows left out
    assert costs.cell[by_key(groups)["small", "gptq", 64].cells[0].cell_id] == 8.0
