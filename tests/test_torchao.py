"""torchao engine (tasks/quantize/engines/torchao.py): int8 and fp8 weight-only on the tiny Llama."""

from __future__ import annotations

import copy

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
