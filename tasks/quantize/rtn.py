"""Round-to-nearest group quantization in torch, at any group size, with either zero-point
convention. Also the group quantizer other methods (e.g. group scaling) reuse.

```yaml
methods:
  - {name: rtn, sym: [true, false], zero_point: float, fallback: ragged}
bits: [3, 4]
group_sizes: [32, 64, 128, -1]
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

from collections.abc import Iterator
from typing import Any

import torch

from tasks.quantize.base import LayerReport, QuantReport
from tasks.quantize.registry import RTNConfig

HEAD_NAMES = ("lm_head",)


def linear_layers(model: torch.nn.Module, include_head: bool = False) -> list[tuple[str, torch.nn.Linear]]:
    """The model's linear layers in order; the output head is left out unless asked for."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and (include_head or name.split(".")[-1] not in HEAD_NAMES)]


def group_layout(width: int, group_size: int, fallback: str) -> tuple[list[int], str | None]:
    """Group widths covering ``width`` input channels, and the fallback used (None if none)."""
    if group_size == -1 or group_size >= width:
        return [width], None
    if width % group_size == 0:
        return [group_size] * (width // group_size), None
    if fallback == "ragged":
        return [group_size] * (width // group_size) + [width % group_size], "ragged"
    if fallback == "divisor":
        size = max(d for d in range(1, group_size) if width % d == 0)
        return [size] * (width // size), "divisor"
    return [], "skip"


def describe_layout(groups: list[int]) -> str:
    if not groups:
        return "none"
    head, count = groups[0], sum(1 for g in groups if g == groups[0])
    tail = [g for g in groups[count:]]
    return f"{count}x{head}" + "".join(f"+{g}" for g in tail)


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


def fake_quantize(weight: torch.Tensor, bits: int, groups: list[int], sym: bool,
                  zero_point: str | None) -> tuple[torch.Tensor, int, int]:
    """Quantize a [out, in] weight with the given group widths along ``in``."""
    pieces, scales, zeros, start = [], 0, 0, 0
    # Groups of one width are quantized in one batched call; a ragged tail gets its own.
    runs: list[tuple[int, int]] = []
    for width in groups:
        if runs and runs[-1][0] == width:
            runs[-1] = (width, runs[-1][1] + 1)
        else:
            runs.append((width, 1))
    for width, count in runs:
        block = weight[:, start:start + width * count]
        shaped = block.reshape(block.shape[0], count, width)
        deq, s, z = quantize_groups(shaped, bits, sym, zero_point)
        pieces.append(deq.reshape(block.shape))
        scales, zeros, start = scales + s, zeros + z, start + width * count
    return torch.cat(pieces, dim=1).to(weight.dtype), scales, zeros


def layer_plan(model: torch.nn.Module, group_size: int, fallback_policy: str,
               ) -> Iterator[tuple[str, torch.nn.Linear, list[int], str | None, LayerReport | None]]:
    """Each linear layer with its group widths and fallback; ``kept`` is the report of a layer
    that stays in the model's dtype (the output head, or a ``skip`` fallback), else None."""
    for name, module in linear_layers(model, include_head=True):
        out_f, in_f = module.weight.shape
        if name.split(".")[-1] in HEAD_NAMES:
            yield name, module, [], None, LayerReport(
                name=name, in_features=in_f, out_features=out_f, quantized=False,
                reason="output head kept in dtype")
            continue
        groups, fallback = group_layout(in_f, group_size, fallback_policy)
        kept = None if groups else LayerReport(
            name=name, in_features=in_f, out_features=out_f, quantized=False, fallback=fallback,
            group_size=group_size,
            reason=f"width {in_f} not a multiple of group size {group_size} (fallback: skip)")
        yield name, module, groups, fallback, kept


class RTN:
    def quantize(self, model: Any, calib: Any, cfg: RTNConfig, bits: int | None,
                 group_size: int | None) -> QuantReport:
        assert bits is not None and group_size is not None
        layers: list[LayerReport] = []
        used_fallback = None
        for name, module, groups, fallback, kept in layer_plan(model, group_size, cfg.fallback):
            used_fallback = used_fallback or fallback
            if kept is not None:
                layers.append(kept)
                continue
            out_f, in_f = module.weight.shape
            with torch.no_grad():
                original = module.weight.data
                deq, scales, zeros = fake_quantize(original, bits, groups, cfg.sym, cfg.zero_point)
                error = (torch.linalg.vector_norm(deq.float() - original.float())
                         / torch.linalg.vector_norm(original.float()).clamp_min(1e-30)).item()
                module.weight.data = deq
            layers.append(LayerReport(
                name=name, in_features=in_f, out_features=out_f, quantized=True, bits=bits,
                group_size=group_size, group_layout=describe_layout(groups), fallback=fallback,
                codes=in_f * out_f, scales=scales, zeros=zeros,
                zero_bits=0 if cfg.sym else (16 if cfg.zero_point == "float" else bits),
                relative_error=error))
        return QuantReport(weight_format="fake-quant", kernel="dequantized", layers=layers,
                           fallback=used_fallback)
