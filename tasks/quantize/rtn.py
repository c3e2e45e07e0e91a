"""Round-to-nearest group quantization in torch, at any group size, with either zero-point
convention. Also the group quantizer other methods (e.g. group scaling) reuse.

```yaml
methods:
  - {name: rtn, sym: [true, false], zero_point: float}
bits: [3, 4]
group_sizes: [32, 64, 128, -1]
group_fallback: ragged       # widths a group size does not divide: see tasks.quantize.layers
```

Conventions (``maxq = 2**bits - 1``; scales and float zero points are rounded to float16, as
packed formats store them, so the fake-quant weights equal what a packed format would hold):

- symmetric: ``scale = 2·max|w| / maxq``, ``q = clamp(round(w/scale) + 2**(bits-1), 0, maxq)``,
  ``w' = scale·(q - 2**(bits-1))`` (the GPTQ reference convention; no zero point stored);
- asymmetric, ``zero_point: int``: the range is widened to include 0, ``scale = (max-min)/maxq``,
  ``z = round(-min/scale)``, ``w' = scale·(q - z)`` (GPTQ/AWQ formats; z stored in ``bits``);
- asymmetric, ``zero_point: float``: ``scale = (max-min)/maxq``, ``q = round((w-min)/scale)``,
  ``w' = min + scale·q`` (llama.cpp Q4_1, HQQ; min stored as float16).

The model stays dequantized (``weight_format: fake-quant``); sizes are counted from the codes,
scales and zeros a packed format would store.
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.layers import LayerPlan, describe_layout, plan_layers
from tasks.quantize.registry import RTNConfig


def quantize_groups(weight: torch.Tensor, bits: int, sym: bool, zero_point: str | None,
                    ) -> tuple[torch.Tensor, int, int]:
    """Fake-quantize ``weight`` [rows, groups, group_width] along its last axis.

    Returns the dequantized tensor, the number of scales and of zero points stored.
    """
    w = weight.float()
    maxq = 2**bits - 1
    if sym:
        absmax = w.abs().amax(dim=-1, keepdim=True)
        scale = (2 * absmax / maxq).half().float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        mid = 2 ** (bits - 1)
        q = torch.clamp(torch.round(w / scale) + mid, 0, maxq)
        return scale * (q - mid), scale.numel(), 0
    wmin = w.amin(dim=-1, keepdim=True)
    wmax = w.amax(dim=-1, keepdim=True)
    if zero_point == "float":
        wmin = wmin.half().float()
        scale = ((wmax - wmin) / maxq).half().float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round((w - wmin) / scale), 0, maxq)
        return wmin + scale * q, scale.numel(), wmin.numel()
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    both_zero = (wmin == 0) & (wmax == 0)
    wmin = torch.where(both_zero, -torch.ones_like(wmin), wmin)
    wmax = torch.where(both_zero, torch.ones_like(wmax), wmax)
    scale = ((wmax - wmin) / maxq).half().float()
    zero = torch.round(-wmin / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero), scale.numel(), zero.numel()


def fake_quantize(weight: torch.Tensor, bits: int, groups: list[int] | tuple[int, ...], sym: bool,
                  zero_point: str | None) -> tuple[torch.Tensor, int, int]:
    """Quantize a [out, in] weight with the given group widths along ``in``. Groups that cover
    more than ``in`` (``pad``) are quantized with zero columns appended, which are then cut."""
    width = weight.shape[1]
    if sum(groups) > width:
        weight = torch.nn.functional.pad(weight, (0, sum(groups) - width))
    pieces, scales, zeros, start = [], 0, 0, 0
    # Groups of one width are quantized in one batched call; a ragged tail gets its own.
    runs: list[tuple[int, int]] = []
    for group in groups:
        if runs and runs[-1][0] == group:
            runs[-1] = (group, runs[-1][1] + 1)
        else:
            runs.append((group, 1))
    for group, count in runs:
        block = weight[:, start:start + group * count]
        shaped = block.reshape(block.shape[0], count, group)
        deq, s, z = quantize_groups(shaped, bits, sym, zero_point)
        pieces.append(deq.reshape(block.shape))
        scales, zeros, start = scales + s, zeros + z, start + group * count
    return torch.cat(pieces, dim=1)[:, :width].to(weight.dtype), scales, zeros


def kept_report(plan: LayerPlan) -> LayerReport:
    """The record of a layer the plan keeps in dtype."""
    return LayerReport(name=plan.name, in_features=plan.in_features, out_features=plan.out_features,
                       quantized=False, group_size=plan.group_size, fallback=plan.fallback,
                       reason=plan.reason, override=plan.override)


def quantized_report(plan: LayerPlan, scales: int, zeros: int, zero_bits: int, error: float,
                     **extra: Any) -> LayerReport:
    """The record of a quantized layer; codes count padded columns under ``pad``."""
    return LayerReport(
        name=plan.name, in_features=plan.in_features, out_features=plan.out_features, quantized=True,
        bits=plan.bits, group_size=plan.group_size,
        group_layout=describe_layout(list(plan.groups), plan.in_features), fallback=plan.fallback,
        codes=sum(plan.groups) * plan.out_features, scales=scales, zeros=zeros, zero_bits=zero_bits,
        relative_error=error, override=plan.override, **extra)


def relative_error(new: torch.Tensor, original: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(new.float() - original.float())
            / torch.linalg.vector_norm(original.float()).clamp_min(1e-30)).item()


def zero_bits(cfg: RTNConfig, bits: int) -> int:
    return 0 if cfg.sym else (16 if cfg.zero_point == "float" else bits)


class RTN:
    def quantize(self, model: Any, calib: Any, cfg: RTNConfig, bits: int | None,
                 group_size: int | None, ctx: QuantContext | None = None) -> QuantReport:
        assert bits is not None and group_size is not None
        layers: list[LayerReport] = []
        for plan in plan_layers(model, bits, group_size, cfg):
            if not plan.quantized:
                layers.append(kept_report(plan))
                continue
            with torch.no_grad():
                original = plan.module.weight.data
                deq, scales, zeros = fake_quantize(original, plan.bits, plan.groups, cfg.sym, cfg.zero_point)
                plan.module.weight.data = deq
            layers.append(quantized_report(plan, scales, zeros, zero_bits(cfg, plan.bits),
                                           relative_error(deq, original)))
        return QuantReport(weight_format="fake-quant", kernel="dequantized", layers=layers)
