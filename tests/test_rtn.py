from __future__ import annotations

import pytest
import torch

from tasks.quantize.registry import RTNConfig
from tasks.quantize.rtn import RTN, describe_layout, fake_quantize, group_layout


def test_group_layouts():
    assert group_layout(576, 128, "ragged") == ([128] * 4 + [64], "ragged")
    assert group_layout(576, 128, "divisor") == ([96] * 6, "divisor")
    assert group_layout(576, 128, "skip") == ([], "skip")
    assert group_layout(576, 64, "ragged") == ([64] * 9, None)
    assert group_layout(576, -1, "ragged") == ([576], None)
    assert describe_layout([128] * 4 + [64]) == "4x128+64"


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
