"""torchao 0.18 engine: int8 and float8 (E4M3) weight-only, quantized with ``quantize_``.

```yaml
methods:
  - {name: int8, engine: torchao}
  - {name: fp8, engine: torchao}
bits: [8]
group_sizes: [-1, 128]        # -1: one scale per output channel (torchao's PerRow)
group_fallback: largest_divisor
```

Each planned layer is quantized in place by ``quantize_`` with its own granularity:
``PerRow()`` for group size -1, ``PerGroup(g)`` otherwise (torchao asserts that ``g`` divides
the width, so ``ragged`` and ``pad`` are not offered; ``largest_divisor`` and ``skip_layer`` come
from the layer plan). The weight becomes a torchao tensor subclass that the model computes with:

- ``Int8WeightOnlyConfig`` → ``Int8Tensor``: int8 codes, a float32 scale and an int8 zero point
  (always 0: symmetric, but stored) per row or group. Per row, ``F.linear`` multiplies by the
  int8 codes cast to the activation dtype and scales the output; per group it dequantizes first.
- ``Float8WeightOnlyConfig`` → ``Float8Tensor``: float8_e4m3fn codes and a float32 scale per row
  or group; on CPU ``F.linear`` dequantizes the weight and multiplies in the activation dtype
  (the fp8 matmul kernels are CUDA-only; weight-only needs none).

No checkpoint is written: torchao models save only through ``TorchAoConfig`` and safetensors
support that transformers 5 reloads for a subset of configs; the size comes from the arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.layers import LayerPlan, plan_layers
from tasks.quantize.rtn import kept_report, quantized_report, relative_error


def _granularity(plan: LayerPlan) -> Any:
    from torchao.quantization.granularity import PerGroup, PerRow

    size = plan.effective_group_size
    if size == -1 or size == plan.in_features:
        return PerRow()
    if plan.fallback in ("ragged", "pad") or plan.in_features % size:
        raise ValueError(f"torchao: {plan.name}: group size {plan.group_size} on width {plan.in_features} "
                         f"(group_fallback {plan.fallback}): torchao needs a dividing group size; "
                         "use largest_divisor, skip_layer or error")
    return PerGroup(size)


def _quantize(model: Any, cfg: Any, bits: int | None, group_size: int | None, kind: str) -> QuantReport:
    import torchao
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    assert bits is not None and group_size is not None
    layers: list[LayerReport] = []
    for plan in plan_layers(model, bits, group_size, cfg):
        if not plan.quantized:
            layers.append(kept_report(plan))
            continue
        if plan.bits != 8:
            raise ValueError(f"torchao {kind}: {plan.name}: bits {plan.bits}; {kind} weights are 8 bits")
        granularity = _granularity(plan)
        # set_inductor_config=False: no global torch._inductor settings changed behind the sweep
        config = (Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
                  if kind == "int8" else
                  Float8WeightOnlyConfig(granularity=granularity, set_inductor_config=False))
        original = plan.module.weight.detach().clone()
        quantize_(plan.module, config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
        weight = plan.module.weight
        with torch.no_grad():
            error = relative_error(weight.dequantize(), original)
        scales = weight.scale.numel()
        scale_bits = weight.scale.element_size() * 8
        zero_point = getattr(weight, "zero_point", None)
        zeros = zero_point.numel() if zero_point is not None else 0
        zero_bits = zero_point.element_size() * 8 if zero_point is not None else 0
        layers.append(quantized_report(plan, scales=scales, zeros=zeros, zero_bits=zero_bits,
                                       error=error, scale_bits=scale_bits))
    per_row = all(layer.group_layout.startswith("1x") for layer in layers if layer.quantized)
    kernel = ("torchao-int8-weight-only (int8 codes cast to the activation dtype, mm, row scale)"
              if kind == "int8" and per_row else f"torchao-{kind}-weight-only (dequantize, then mm)")
    return QuantReport(weight_format=f"torchao-{kind}", kernel=kernel, layers=layers,
                       engine=f"torchao {torchao.__version__}")


def int8(model: Any, calib: Any, cfg: Any, bits: int | None, group_size: int | None,
         ctx: QuantContext) -> QuantReport:
    """int8 weight-only (``Int8WeightOnlyConfig``), per output channel or per group."""
    return _quantize(model, cfg, bits, group_size, "int8")


def fp8(model: Any, calib: Any, cfg: Any, bits: int | None, group_size: int | None,
        ctx: QuantContext) -> QuantReport:
    """float8 E4M3 weight-only (``Float8WeightOnlyConfig``), per output channel or per group."""
    return _quantize(model, cfg, bits, group_size, "fp8")
