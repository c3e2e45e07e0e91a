"""Group scaling quantization (GSQ): an activation-aware scaling transform followed by the same
group quantizer ``rtn`` uses, one shared scale (and zero point) per group.

```yaml
methods:
  - {name: gsq, sym: false, zero_point: int, alpha_grid: 20}
bits: [3, 4]
group_sizes: [64, 128]
calibration: {dataset: pydoc-topics, samples: 32, seq_len: 256}
```

Per linear layer, with ``m`` = mean |x| per input channel of the layer's input on the
calibration windows (measured on the unquantized model, ``tasks.calibration``), the search tries
``s = m**alpha`` (normalised so that sqrt(max(s)·min(s)) = 1, rounded to float16) for alpha in
``0, 1/alpha_grid, ..., 1`` and keeps the alpha whose weight

    W' = Q(W · diag(s)) · diag(s)^-1        (Q: rtn's group quantizer, same groups and fallback)

has the smallest output error ||(W - W') X^T||_F over the calibration inputs X, computed exactly
from the Gram matrix X^T X. Scaling up the channels that carry large activations gives their
weights finer steps, at the cost of the others (AWQ's observation, searched as AWQ does).
alpha = 0 is s = 1, i.e. rtn itself, so a layer's output error is never above rtn's.

The model stays dequantized (``weight_format: fake-quant``): the layer holds W'. A packed
format stores the codes, one scale (and zero) per group and the layer's input-channel scales
(float16, folded into the previous operation by formats that can); the size counts all three.
Each layer's chosen alpha is in its record (``layers[].scale_alpha``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tasks.calibration import Calibration, LayerStats
from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.layers import plan_layers
from tasks.quantize.registry import GSQConfig
from tasks.quantize.rtn import (
    fake_quantize,
    kept_report,
    quantized_report,
    relative_error,
    zero_bits,
)

log = logging.getLogger(__name__)


def channel_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean_abs**alpha``, normalised to a geometric mid-range of 1, as float16 would store it."""
    scales = mean_abs.pow(alpha).clamp_min(1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    return scales.half().float()


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """||delta · X^T||_F^2 / tokens, from gram = X^T X / tokens."""
    return ((delta @ gram) * delta).sum().item()


def search_scales(weight: torch.Tensor, stats: LayerStats, bits: int, groups: tuple[int, ...],
                  cfg: GSQConfig) -> tuple[torch.Tensor, float, float, int, int]:
    """The scaled-then-quantized weight with the smallest output error: (W', alpha, error,
    scales, zeros). Ties keep the smaller alpha, so alpha = 0 (rtn) wins unless beaten."""
    w = weight.float()
    mean_abs, gram = stats.mean_abs.to(w.device), stats.gram.to(w.device)
    best: tuple[torch.Tensor, float, float, int, int] | None = None
    for step in range(cfg.alpha_grid + 1):
        alpha = step / cfg.alpha_grid
        s = channel_scales(mean_abs, alpha)
        deq, scales, zeros = fake_quantize(w * s, bits, groups, cfg.sym, cfg.zero_point)
        folded = deq / s
        error = output_error(folded - w, gram)
        if best is None or error < best[2]:
            best = (folded, alpha, error, scales, zeros)
    assert best is not None
    return best


class GSQ:
    def quantize(self, model: Any, calib: Calibration | None, cfg: GSQConfig, bits: int | None,
                 group_size: int | None, ctx: QuantContext | None = None) -> QuantReport:
        assert bits is not None and group_size is not None
        if calib is None:
            raise ValueError("gsq needs calibration data: add `calibration: {dataset, samples, seq_len}` to the spec")
        layers: list[LayerReport] = []
        for plan in plan_layers(model, bits, group_size, cfg):
            if not plan.quantized:
                layers.append(kept_report(plan))
                continue
            if plan.name not in calib.stats:
                raise ValueError(f"gsq: no calibration statistics for layer {plan.name} (it saw no input)")
            with torch.no_grad():
                original = plan.module.weight.data
                folded, alpha, error, scales, zeros = search_scales(original, calib.stats[plan.name],
                                                                    plan.bits, plan.groups, cfg)
                plan.module.weight.data = folded.to(original.dtype)
            log.debug("gsq %s: alpha=%.2f output error %.3g", plan.name, alpha, error)
            layers.append(quantized_report(plan, scales + (plan.in_features if alpha > 0 else 0), zeros,
                                           zero_bits(cfg, plan.bits), relative_error(folded, original),
                                           scale_alpha=alpha))
        return QuantReport(weight_format="fake-quant", kernel="dequantized", layers=layers)
