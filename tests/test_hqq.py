"""hqq (tasks/quantize/hqq.py) on the tiny Llama: packed HQQLinear modules, error vs rtn, sizes."""

from __future__ import annotations

import copy

import pytest
import torch

from tasks.profile.sizes import weight_size
from tasks.quantize.hqq import HQQ
from tasks.quantize.registry import HQQConfig, RTNConfig, get_method
from tasks.quantize.rtn import RTN

pytest.importorskip("hqq")


def _tiny(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _mean_error(report) -> float:
    layers = report.quantized_layers
    return sum(layer.relative_error for layer in layers) / len(layers)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_error_below_rtn_asymmetric(tiny_llama, bits):
    """hqq's optimised zero points and scales beat rtn's min/max ones at the same group size."""
    base = _tiny(tiny_llama)
    hqq = HQQ().quantize(copy.deepcopy(base), None, HQQConfig(), bits, 32)
    for zero_point in ("int", "float"):
        rtn = RTN().quantize(copy.deepcopy(base), None, RTNConfig(sym=False, zero_point=zero_point), bits, 32)
        assert _mean_error(hqq) < 0.97 * _mean_error(rtn), (zero_point, _mean_error(hqq), _mean_error(rtn))


def test_hqq_without_optimisation_is_rtn_int_zero(tiny_llama):
    """At 4 bits hqq rounds the zero point: without its solver it is rtn's asymmetric int zero."""
    base = _tiny(tiny_llama)
    hqq = HQQ().quantize(copy.deepcopy(base), None, HQQConfig(optimize=False), 4, 32)
    rtn = RTN().quantize(copy.deepcopy(base), None, RTNConfig(sym=False, zero_point="int"), 4, 32)
    for a, b in zip(hqq.quantized_layers, rtn.quantized_layers, strict=True):
        assert a.relative_error == pytest.approx(b.relative_error, rel=0.02), a.name


def test_hqq_model_is_packed_and_matches_its_dequantized_weights(tiny_llama):
    from hqq.core.quantize import HQQLinear

    model = _tiny(tiny_llama)
    ids = torch.randint(3, 200, (2, 16))
    report = HQQ().quantize(model, None, HQQConfig(), 4, 32)
    assert report.weight_format == "hqq" and report.kernel == "hqq-dequant-torch"
    assert report.engine.startswith("hqq ") and report.checkpoint_dir is None
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, HQQLinear) and layer.W_q.dtype == torch.uint8
    assert layer.W_q.numel() == 96 * 128 // 2  # two 4-bit codes per byte
    assert layer.meta["scale"].dtype == layer.meta["zero"].dtype == torch.float16
    assert layer.meta["scale"].numel() == 96 * 128 // 32
    x = torch.randn(3, 128)
    assert torch.allclose(layer(x), x @ layer.dequantize().T, atol=1e-5)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()
    assert model.lm_head.__class__ is torch.nn.Linear  # head kept in dtype


def test_hqq_sizes(tiny_llama):
    """4 bits + fp16 scale and zero per group: 4 + 32/g bits; the packed parameter is not counted
    twice (once by the arithmetic, once as a dense uint8 parameter)."""
    model = _tiny(tiny_llama)
    dense = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    report = HQQ().quantize(model, None, HQQConfig(), 4, 32)
    assert report.bits_per_weight() == pytest.approx(4 + 32 / 32)
    quantized = sum(layer.codes for layer in report.quantized_layers)
    assert quantized == 2 * (96 * 96 * 2 + 96 * 48 * 2 + 96 * 128 * 3)
    kept = sum(v for n, v in dense.items() if "layers" not in n or "norm" in n)
    assert weight_size(model, report).weight_bytes == kept + quantized * 5 // 8
    # 3 bits: hqq stores 10 codes per int32 (30 of 32 bits) in rows of groups padded to a
    # multiple of 10: 144 groups of 32 -> 15 int32 rows of 32 = 150 group rows; counted as stored
    three_model = _tiny(tiny_llama)
    three = HQQ().quantize(three_model, None, HQQConfig(), 3, 32)
    k_proj = next(layer for layer in three.quantized_layers if layer.name.endswith("k_proj"))
    assert k_proj.scales == 48 * 96 // 32 == 144 and k_proj.codes == 48 * 96
    assert k_proj.stored_bits() == 15 * 32 * 32 + 144 * 32  # W_q int32 [15, 32] + fp16 scale, zero
    assert three.bits_per_weight() > 3.2 + 32 / 32


def test_hqq_group_fallbacks(tiny_llama):
    """96 is not a multiple of 64: largest_divisor quantizes at 48, skip_layer keeps the layer;
    ragged (which hqq cannot do) is outside the capabilities and refused by the method."""
    report = HQQ().quantize(_tiny(tiny_llama), None, HQQConfig(group_fallback="largest_divisor"), 4, 64)
    q_proj = next(layer for layer in report.layers if layer.name.endswith("q_proj"))
    assert q_proj.group_layout == "2x48" and q_proj.fallback == "largest_divisor"
    skipped = HQQ().quantize(_tiny(tiny_llama), None, HQQConfig(group_fallback="skip_layer"), 4, 64)
    assert [layer.name.split(".")[-1] for layer in skipped.quantized_layers] == ["down_proj"] * 2
    caps = get_method("hqq").capabilities
    assert "cannot apply group_fallback=ragged" in caps.unsupported(4, 64, "ragged", {"hidden_size": 96}, False)
    with pytest.raises(ValueError, match="largest_divisor"):
        HQQ().quantize(_tiny(tiny_llama), None, HQQConfig(group_fallback="ragged"), 4, 64)
