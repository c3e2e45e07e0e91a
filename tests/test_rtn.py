from __future__ import annotations

import pytest
import torch

from tasks.quantize.layers import describe_layout, group_layout, plan_layers
from tasks.quantize.registry import RTNConfig
from tasks.quantize.rtn import RTN, fake_quantize


def test_group_layouts():
    assert group_layout(576, 128, "ragged") == ([128] * 4 + [64], "ragged")
    assert group_layout(576, 128, "largest_divisor") == ([96] * 6, "largest_divisor")
    assert group_layout(576, 128, "pad") == ([128] * 5, "pad")
    assert group_layout(576, 128, "skip_layer") == ([], "skip_layer")
    assert group_layout(576, 64, "error") == ([64] * 9, None)
    with pytest.raises(ValueError, match="group_fallback is 'error'"):
        group_layout(576, 128, "error")
    assert group_layout(576, -1, "ragged") == ([576], None)
    assert describe_layout([128] * 4 + [64]) == "4x128+64"
    assert describe_layout([128] * 5, 576) == "5x128 (pad 64)"


def test_pad_equals_ragged_values_and_counts_padded_codes():
    # Zero columns change neither a symmetric absmax nor an int zero point's range (which
    # includes 0 already): padded and ragged quantization give the same weights.
    torch.manual_seed(2)
    w = torch.randn(8, 96)
    for sym, zero_point in ((True, None), (False, "int")):
        padded, scales, _ = fake_quantize(w, 4, [64, 64], sym, zero_point)
        ragged, _, _ = fake_quantize(w, 4, [64, 32], sym, zero_point)
        assert padded.shape == w.shape and torch.equal(padded, ragged) and scales == 16


def test_plan_overrides_and_policies(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = RTNConfig(sym=False, group_fallback="largest_divisor", overrides=(
        {"pattern": "lm_head", "bits": 8}, {"pattern": "model.layers.0.*", "bits": 8, "group_size": 32},
        {"pattern": "*.down_proj", "keep": True}))
    plans = {p.name: p for p in plan_layers(model, 4, 64, cfg)}
    assert plans["lm_head"].bits == 8 and plans["lm_head"].override == "lm_head"
    assert plans["model.layers.0.self_attn.q_proj"].bits == 8
    assert plans["model.layers.0.self_attn.q_proj"].groups == (32, 32, 32)  # 96 divides by 32
    assert plans["model.layers.1.self_attn.q_proj"].groups == (48, 48)  # largest divisor of 96 <= 64
    assert plans["model.layers.1.self_attn.q_proj"].fallback == "largest_divisor"
    assert plans["model.layers.1.mlp.up_proj"].bits == 4 and plans["model.layers.1.mlp.up_proj"].groups == (48, 48)
    assert not plans["model.layers.1.mlp.down_proj"].quantized  # layer 0's matches its own pattern first
    assert plans["model.layers.0.mlp.down_proj"].bits == 8
    report = RTN().quantize(model, None, cfg, bits=4, group_size=64)
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["lm_head"].quantized and by_name["lm_head"].bits == 8
    assert by_name["model.layers.1.mlp.down_proj"].reason.startswith("kept in dtype by override")
    skip = RTN().quantize(AutoModelForCausalLM.from_pretrained(tiny_llama), None,
                          RTNConfig(group_fallback="skip_layer"), bits=4, group_size=64)
    kept = [layer for layer in skip.layers if not layer.quantized and layer.fallback == "skip_layer"]
    assert {layer.in_features for layer in kept} == {96} and skip.fallback == "skip_layer"


@pytest.mark.parametrize("sym,zero_point", [(True, None), (False, "int"), (False, "float")])
def test_levels_and_error(sym, zero_point):
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    errors = []
    for bits in (2, 3, 4, 8):
        deq, scales, zeros = fake_quantize(w, bits, [64] * 4, sym, zero_point)
        for row in range(2):
            for g in range(4):
                assert deq[row, g * 64:(g + 1) * 64].unique().numel() <= 2**bits
        assert scales == 16 * 4 and zeros == (0 if sym else 16 * 4)
        errors.append(((deq - w).norm() / w.norm()).item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_float_zero_point_reproduces_min_plus_scale_q_exactly():
    # Weights stored as llama.cpp Q4_1 stores them: fp16 min + fp16 scale * q, q in 0..15,
    # with each block using its full range.
    torch.manual_seed(1)
    mins = torch.randn(8, 4, 1).half().float()
    scales = (torch.rand(8, 4, 1) * 0.1 + 0.01).half().float()
    q = torch.randint(0, 16, (8, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15
    w = (mins + scales * q).reshape(8, 128)
    exact, _, _ = fake_quantize(w, 4, [32] * 4, sym=False, zero_point="float")
    assert torch.equal(exact, w)
    integer, _, _ = fake_quantize(w, 4, [32] * 4, sym=False, zero_point="int")
    assert ((integer - w).norm() / w.norm()).item() > 0.01


def test_rtn_on_tiny_llama_reports_fallback_and_sizes(tiny_llama):
    from transformers import AutoModelForCausalLM

    from tasks.profile import weight_size

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    dense = sum(p.numel() * 4 for p in model.parameters())
    report = RTN().quantize(model, None, RTNConfig(sym=False, zero_point="int"), bits=4, group_size=64)
    quantized = report.quantized_layers
    assert len(quantized) == 2 * 7  # 7 linear layers per block, head kept
    ragged = [layer for layer in quantized if layer.fallback]
    assert {layer.in_features for layer in ragged} == {96}  # 96 = 64 + 32
    assert all(layer.group_layout == "1x64+32" for layer in ragged)
    assert report.fallback == "ragged"
    size = weight_size(model, report)
    codes = sum(layer.codes for layer in quantized)
    groups = sum(layer.scales for layer in quantized)
    assert size.bits_per_weight == pytest.approx((4 * codes + (16 + 4) * groups) / codes)
    assert size.weight_bytes == dense - 4 * codes + (4 * codes + 20 * groups + 7) // 8
