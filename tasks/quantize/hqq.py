"""Half-quadratic quantization (HQQ), calibration-free, with hqq's own API.

```yaml
methods:
  - {name: hqq, optimize: true}
bits: [2, 3, 4, 8]
group_sizes: [64, 128]
group_fallback: largest_divisor     # or skip_layer / error; hqq cannot do ragged or pad
```

Each planned ``nn.Linear`` is replaced by an ``hqq.core.quantize.HQQLinear`` (axis 1: groups
along the input width, asymmetric, ``w = (q - zero) · scale``; with ``optimize`` the zero
points and scales are refined by hqq's half-quadratic solver of an lp (p < 1) weight error).
transformers 5 no longer quantizes or loads HQQ models on CPU (its ``HqqHfQuantizer`` refuses
a CPU device map and its pre-quantized load path is commented out), so the modules are swapped
here and no checkpoint is written.

What the model holds and computes with: the packed codes (``W_q``: 8/4/2/1 bits in uint8; 3
bits as 10 codes per int32) and one scale and one zero point per group in 16 bits (float16,
or bfloat16 for a bfloat16 model: hqq keeps them in the compute dtype, which would be 32 bits
for a float32 model, so they are rounded to float16 here; the dequantized weight is computed
in the model's dtype). Each forward dequantizes the whole weight in torch and multiplies
(hqq's ``PYTORCH`` backend, the one that runs on CPU): ``kernel: hqq-dequant-torch``.

Limits found in hqq 0.2.8 (``Quantizer.quantize``): with axis 1 the weight is reshaped to
``[-1, group_size]``, so a group size that does not divide the width silently makes groups
that straddle rows; such layers are refused here unless the plan gives them a dividing size
(``largest_divisor``) or keeps them (``skip_layer``). Bit packing stacks the groups' rows, so
the number of groups must be a multiple of 2 (4 bits), 4 (2 bits) or 8 (1 bit). 5 and 6 bits
are stored one code per byte (no packing) and are not offered.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.layers import LayerPlan, plan_layers
from tasks.quantize.registry import HQQConfig
from tasks.quantize.rtn import kept_report, quantized_report, relative_error

# Rows of groups one packed row holds: the number of groups must be a multiple of it.
PACK_ROWS = {1: 8, 2: 4, 3: 1, 4: 2, 8: 1}


def hqq_linear(module: torch.nn.Linear, bits: int, group_size: int, optimize: bool) -> Any:
    """``module`` quantized by hqq (``group_size`` -1: one group per output row)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    width = module.in_features
    size = width if group_size == -1 else group_size
    if width % size:
        raise ValueError(f"hqq: group size {size} does not divide width {width}: hqq would make "
                         "groups that straddle rows; use group_fallback largest_divisor or skip_layer")
    groups = module.out_features * width // size
    if groups % PACK_ROWS[bits]:
        raise ValueError(f"hqq: {groups} groups of {size} cannot be packed at {bits} bits "
                         f"(needs a multiple of {PACK_ROWS[bits]} groups); keep the layer with an override")
    config = BaseQuantizeConfig(nbits=bits, group_size=64, axis=1)
    # BaseQuantizeConfig asks for multiples of 8 (its GPU kernels); the torch quantizer only
    # needs the group to divide the width, checked above.
    config["weight_quant_params"].update(group_size=size, optimize=optimize)
    dtype = module.weight.dtype
    layer = HQQLinear(module, config, compute_dtype=dtype, device=str(module.weight.device), del_orig=False)
    del layer.linear_layer  # the caller keeps the original module (its plan reads its shape)
    meta_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    for key in ("scale", "zero"):  # stored in 16 bits as hqq's checkpoints of a 16-bit model hold them
        layer.meta[key] = layer.meta[key].to(meta_dtype)
    return layer


def _quantize_layer(model: Any, plan: LayerPlan, cfg: HQQConfig) -> LayerReport:
    if plan.fallback in ("ragged", "pad"):
        raise ValueError(f"hqq cannot apply group_fallback={plan.fallback} to {plan.name} "
                         f"(width {plan.in_features}, group size {plan.group_size}); it can: "
                         "largest_divisor, skip_layer, error")
    original = plan.module.weight.detach().clone()
    layer = hqq_linear(plan.module, plan.bits, plan.effective_group_size, cfg.optimize)
    with torch.no_grad():
        error = relative_error(layer.dequantize(), original)
    model.set_submodule(plan.name, layer)
    groups = len(plan.groups) * plan.out_features
    report = quantized_report(plan, scales=groups, zeros=groups, zero_bits=16, error=error)
    # the codes as hqq stores them: 8/4/2/1 bits fill uint8 exactly; 3 bits go 10 to an int32
    # (2 bits of 32 unused) in rows of groups padded to a multiple of 10
    stored = layer.W_q.numel() * layer.W_q.element_size() * 8
    return replace(report, code_bits=stored / report.codes)


class HQQ:
    """HQQ with hqq's native ``HQQLinear`` (packed codes, dequantized per forward)."""

    def quantize(self, model: Any, calib: Any, cfg: HQQConfig, bits: int | None,
                 group_size: int | None, ctx: QuantContext | None = None) -> QuantReport:
        import hqq

        assert bits is not None and group_size is not None
        layers: list[LayerReport] = []
        for plan in plan_layers(model, bits, group_size, cfg):
            if plan.quantized and plan.bits not in PACK_ROWS:
                raise ValueError(f"hqq: {plan.name}: bits {plan.bits} not supported; "
                                 f"hqq packs {sorted(PACK_ROWS)}")
            layers.append(_quantize_layer(model, plan, cfg) if plan.quantized else kept_report(plan))
        return QuantReport(
            weight_format="hqq", kernel="hqq-dequant-torch", layers=layers,
            engine=f"hqq {hqq.__version__}",
            extra={"checkpoint": "none: transformers 5 cannot load HQQ models on CPU"})
