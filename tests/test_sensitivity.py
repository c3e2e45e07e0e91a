"""Sensitivity studies (orchestrator.sensitivity), the allocator (analysis.allocate) and
calibration as an axis, on the tiny Llama; the SmolLM2 proof is bench/sensitivity_smollm2.py."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cells import count_cells, expand, group_cells
from orchestrator.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[1]
PROFILE = {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}
OPTIONS = [{"bits": 2, "group_size": 32}, {"bits": 4, "group_size": 32}]


def study(tiny_llama, text_file, unit="block", **more) -> dict:
    return {"name": "study", "models": [{"name": "tiny", "path": str(tiny_llama)}],
            "methods": [{"name": "baseline"}],
            "datasets": [{"name": "text", "task": "perplexity", "path": str(text_file), "limit": 2, "seq_len": 64},
                         {"name": "other", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": 2,
                          "seq_len": 64}],
            "sensitivity": {"unit": unit, "method": {"name": "rtn", "sym": False}, "options": OPTIONS, **more},
            "profile": PROFILE}


def quantized_layers(tiny_llama, cell) -> list[str]:
    """The layers the cell's plan quantizes, on the real model."""
    from transformers import AutoModelForCausalLM

    from tasks.quantize.layers import plan_layers
    from tasks.quantize.registry import get_method

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = get_method(cell.method).config(**cell.params)
    return [p.name for p in plan_layers(model, cell.bits, cell.group_size, cfg) if p.quantized]


@pytest.mark.parametrize("unit, count, layers_each", [("block", 2, 7), ("type", 7, 2), ("layer", 14, 1)])
def test_each_unit_cell_quantizes_its_unit_alone(tiny_llama, text_file, unit, count, layers_each):
    from orchestrator.sensitivity import describe

    spec = parse_spec(study(tiny_llama, text_file, unit))
    cells = expand(spec)
    units = [c for c in cells if c.method == "rtn"]
    assert len(units) == count * len(OPTIONS) * 2  # units x options x datasets
    assert len([c for c in cells if c.method == "baseline"]) == 2
    assert len(group_cells(units)) == count * len(OPTIONS)  # one quantization per unit and option
    covered = []
    for cell in units[::2]:  # one dataset's cells
        layers = quantized_layers(tiny_llama, cell)
        assert len(layers) == layers_each, (cell.params["overrides"][0], layers)
        assert describe(cell.params).kind == unit
        covered += layers if cell.bits == 2 else []
    # the units partition the blocks' linear layers: each exactly once per option
    assert sorted(covered) == sorted(set(covered)) and len(covered) == 14
    assert count_cells(spec) == 2  # before the study: the baseline on both datasets


def test_a_unit_cell_is_the_same_cell_as_its_overrides_written_by_hand(tiny_llama, text_file):
    raw = study(tiny_llama, text_file, datasets=["text"])
    by_hand = {"name": "rtn", "sym": False, "bits": [2], "group_sizes": [32],
               "overrides": [{"pattern": "model.layers.1.*", "bits": 2, "group_size": 32},
                             {"pattern": "*", "keep": True}]}
    with_hand = parse_spec({**raw, "methods": [{"name": "baseline"}, by_hand]})
    cells = expand(with_hand)
    ids = [c.cell_id for c in cells]
    assert len(ids) == len(set(ids))  # the study's copy of the hand-written cell is not run twice
    # 2 baselines, the hand-written cell on both datasets, the study's 4 cells on `text` less the one duplicate
    assert len(cells) == 2 + 2 + 3
    assert {c.dataset.name for c in cells if c.method == "rtn" and "layers.0" in c.params["overrides"][0]["pattern"]} == {"text"}


@pytest.mark.parametrize("change, message", [
    ({"unit": "row"}, r"sensitivity.unit='row': allowed: block, layer, type"),
    ({"method": "baseline"}, r"sensitivity.method='baseline': takes no per-layer overrides"),
    ({"method": {"name": "rtn", "bogus": 1}}, r"sensitivity.method.bogus: unknown parameter of 'rtn'"),
    ({"options": [{"bits": 1, "group_size": 32}]}, r"sensitivity.options\[0\].bits=1: 'rtn' supports bits"),
    ({"options": [OPTIONS[0], OPTIONS[0]]}, r"sensitivity.options\[1\].*the same option twice"),
    ({"models": ["nope"]}, r"sensitivity.models\[0\]='nope': not a model of this spec \(tiny\)"),
    ({"datasets": ["nope"]}, r"sensitivity.datasets\[0\]='nope': not a dataset of this spec"),
    ({"extra": 1}, r"sensitivity.extra: unknown key"),
])
def test_a_bad_study_names_the_field_and_what_is_allowed(tiny_llama, text_file, change, message):
    raw = study(tiny_llama, text_file)
    raw["sensitivity"] = {**raw["sensitivity"], **change}
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_a_model_without_weight_headers_is_a_clear_error(tmp_path, text_file):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    spec = parse_spec(study(tmp_path / "m", text_file))
    with pytest.raises(SpecError, match=r"sensitivity: cannot list the linear layers of model 'tiny'"):
        expand(spec)


# -- the allocator ------------------------------------------------------------------------------
def brute_force(costs, losses, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[u][o] for u, o in enumerate(choice))
        loss = sum(losses[u][o] for u, o in enumerate(choice))
        if cost <= budget and (best is None or loss < best[0] - 1e-15):
            best = (loss, choice)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_allocator_finds_the_brute_force_optimum(seed):
    from analysis.allocate import AllocationError, solve

    rng = random.Random(seed)
    units, options = rng.randint(2, 7), rng.randint(2, 4)
    costs = [sorted(rng.randint(1_000, 50_000) for _ in range(options)) for _ in range(units)]
    # more bytes, less loss, with noise (and, sometimes, an option dominated by another)
    losses = [sorted((rng.random() ** 2 for _ in range(options)), reverse=True) for _ in range(units)]
    if seed % 3 == 0:
        losses[0][-1] = losses[0][0] + 0.1
    low, high = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = rng.uniform(low, high)
    expected = brute_force(costs, losses, budget)
    chosen = solve(costs, losses, budget)
    assert sum(costs[u][o] for u, o in enumerate(chosen)) <= budget
    assert sum(losses[u][o] for u, o in enumerate(chosen)) == pytest.approx(expected[0], abs=1e-12)
    with pytest.raises(AllocationError, match="no choice of options meets the budget"):
        solve(costs, losses, low - 1)


def write_rows(store_dir: Path, spec, state) -> list[dict]:
    from inline import run_inline

    from orchestrator.driver import complete_row
    from orchestrator.store import Store

    rows = [complete_row(cell, row, "test", 1) for cell, row in run_inline(spec, state)]
    Store(store_dir).write_rows(rows)
    return rows


def test_study_allocate_run_and_compare_predicted_with_measured(tiny_llama, text_file, tmp_path):
    from analysis.views import connect
    from orchestrator.spec import load_spec
    from tasks.worker import WorkerState

    results = tmp_path / "results"
    state = WorkerState(threads=1)
    rows = write_rows(results, parse_spec(study(tiny_llama, text_file, datasets=["text"])), state)
    assert all(r["status"] == "ok" for r in rows), [r.get("error_message") for r in rows]
    con = connect(str(results))
    view = con.execute("select unit_kind, unit, bits, kl_divergence, unit_params, unit_bytes, "
                       "unit_bits_per_weight from sensitivity order by unit, bits").fetchall()
    assert [(k, u, b) for k, u, b, *_ in view] == [("block", "0", 2), ("block", "0", 4), ("block", "1", 2),
                                                   ("block", "1", 4)]
    # a block of the tiny Llama: q, o 96x96; k, v 96x48; gate, up 96x128; down 128x96
    assert all(v[3] > 0 and v[4] == 2 * 9216 + 2 * 4608 + 3 * 12288 for v in view)
    for _, _, bits, kl, params, unit_bytes, bpw in view:
        assert unit_bytes == pytest.approx(bpw * params / 8)
    kl = {(u, b): k for _, u, b, k, *_ in view}
    assert kl[("0", 2)] > kl[("0", 4)] and kl[("1", 2)] > kl[("1", 4)]
    # a budget between the options: exactly one block can take 4 bits; the allocator gives it to
    # the block whose 4 bits save the most KL
    bpw2, bpw4 = view[0][6], view[1][6]
    out = tmp_path / "mixed.yaml"
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "allocate", "--results", str(results),
                           "--sweep", "study", "--bits-per-weight", str((bpw2 + bpw4) / 2 + 0.01),
                           "--out", str(out), "--name", "mixed"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    saving = {u: kl[(u, 2)] - kl[(u, 4)] for u in ("0", "1")}
    upgraded = max(saving, key=saving.get)
    predicted = kl[(upgraded, 4)] + kl[("1" if upgraded == "0" else "0", 2)]
    assert f"predicted KL {predicted:.5f}" in done.stdout and "interactions between units are ignored" in done.stdout
    written = yaml.safe_load(out.read_text())
    (method,) = written["methods"]
    assert method["name"] == "rtn" and method["sym"] is False
    assert [d["name"] for d in written["datasets"]] == ["other", "text"]  # the study's datasets, baseline's too
    mixed = load_spec(out)
    rows = write_rows(results, mixed, state)
    con = connect(str(results))
    measured = con.execute("select kl_divergence, predicted_kl, allocation from baseline_deltas "
                           "where sweep = 'mixed' and is_primary and dataset = 'text'").fetchall()
    ((kl_measured, kl_predicted, record),) = measured
    assert kl_predicted == pytest.approx(predicted)
    assert kl_measured > 0 and json.loads(record)["solver"].startswith("scipy.optimize.milp")
    # the other dataset had no unit KL in the study: no prediction there, measured all the same
    ((other_predicted,),) = con.execute("select predicted_kl from baseline_deltas where sweep = 'mixed' "
                                        "and is_primary and dataset = 'other'").fetchall()
    assert other_predicted is None
    # unit cells are measurements, not configs: table1's best is the mixed cell, never one of them
    ((best,),) = con.execute("select best_method from table1 where dataset = 'text'").fetchall()
    assert "pattern:*" not in best and best.startswith("rtn(")  # the mixed cell (its overrides: 2-bit blocks)
    from analysis.report import write_report

    page = write_report(str(results), tmp_path / "report").read_text()
    assert "data-file='sensitivity.png'" in page and "Layer sensitivity" in page


def test_allocate_says_what_is_wrong(tiny_llama, text_file, tmp_path):
    results = tmp_path / "results"
    from orchestrator.store import Store

    Store(results)  # an empty store
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "allocate", "--results", str(results),
                           "--sweep", "nope", "--bits-per-weight", "3", "--out", str(tmp_path / "m.yaml")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "sweep 'nope' has no finished sensitivity cells" in done.stderr


# -- calibration as an axis -------------------------------------------------------------------
def calibrated(tiny_llama, text_file, calibration) -> dict:
    return {"name": "calib", "models": [{"name": "tiny", "path": str(tiny_llama)}],
            "methods": [{"name": "baseline"}, {"name": "rtn"}, {"name": "gsq", "alpha_grid": 2}],
            "bits": [4], "group_sizes": [32],
            "datasets": [{"name": "text", "task": "perplexity", "path": str(text_file), "limit": 2, "seq_len": 64}],
            "calibration": calibration, "profile": PROFILE}


def test_calibration_crosses_calibrated_methods_only(tiny_llama, text_file):
    one = {"dataset": "pydoc-topics", "samples": 4, "seq_len": 64}
    single = expand(parse_spec(calibrated(tiny_llama, text_file, one)))
    listed = expand(parse_spec(calibrated(tiny_llama, text_file, [one])))
    assert [c.cell_id for c in single] == [c.cell_id for c in listed]  # a one-item list is the same spec
    crossed = parse_spec(calibrated(tiny_llama, text_file,
                                    [{"dataset": ["pydoc-topics", str(text_file)], "samples": [2, 4], "seq_len": 64}]))
    cells = expand(crossed)
    gsq = [c for c in cells if c.method == "gsq"]
    assert len(gsq) == 4 and len({c.group_id for c in gsq}) == 4
    assert {(c.calibration["dataset"], c.calibration["samples"]) for c in gsq} == {
        ("pydoc-topics", 2), ("pydoc-topics", 4), (str(text_file), 2), (str(text_file), 4)}
    assert all(c.calibration is None for c in cells if c.method != "gsq")  # rtn and baseline: once each
    assert len(cells) == 6 == count_cells(crossed)
    with pytest.raises(SpecError, match=r"calibration\[1\].*the same calibration twice"):
        parse_spec(calibrated(tiny_llama, text_file, [one, one]))
    with pytest.raises(SpecError, match=r"calibration\[0\].samples=0: must be a positive integer"):
        parse_spec(calibrated(tiny_llama, text_file, [{"dataset": "x", "samples": [4, 0]}]))


def test_each_calibration_runs_and_is_recorded(tiny_llama, text_file, tmp_path):
    from inline import run_inline

    from tasks.worker import WorkerState

    spec = parse_spec(calibrated(tiny_llama, text_file, {"dataset": "pydoc-topics", "samples": [1, 3],
                                                         "seq_len": 64}))
    state = WorkerState(threads=1)
    rows = {(cell.method, (cell.calibration or {}).get("samples")): row for cell, row in run_inline(spec, state)}
    assert rows[("gsq", 1)]["status"] == rows[("gsq", 3)]["status"] == "ok"
    assert rows[("gsq", 1)]["calibration_tokens"] == 64 and rows[("gsq", 3)]["calibration_tokens"] == 192
    assert rows[("gsq", 1)]["calibration_hash"] != rows[("gsq", 3)]["calibration_hash"]
    assert state.calibration_runs == 2
    # only the latest calibration's activation statistics stay resident
    assert sum(1 for c in state._calibrations.values() if c.stats) == 1
