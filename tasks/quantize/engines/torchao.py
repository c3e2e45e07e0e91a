"""torchao 0.18 engine: int8 and float8 (E4M3) weight-only, quantized with ``quantize_``, and
int4 weight-only packed for tinygemm (CUDA only).

```yaml
methods:
  - {name: int8, engine: torchao}
  - {name: fp8, engine: torchao}
  - {name: int4, engine: torchao}   # CUDA only: skipped, with the reason, on a worker without one
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

- ``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`` →
  ``Int4TilePackedTo4dTensor``: asymmetric 4-bit codes in tinygemm's tiled layout and one
  bfloat16 (scale, zero) pair per group, the zero in the float domain
  (``w = (q - 8) * scale + zero``); ``F.linear`` runs ``torch.ops.aten._weight_int4pack_mm``
  (tensor cores, compute capability >= 8.0, bfloat16 only). Packing pads the input width to a
  multiple of 1024 and the output width to one of 8 (576 is held as 1024: the padding is
  recorded, sizes count the layer's own weights). torchao's ``plain`` layout needs the mslk
  kernels and ``preshuffled`` fbgemm's; neither is a dependency here.

No checkpoint is written: torchao models save only through ``TorchAoConfig`` and safetensors
support that transformers 5 reloads for a subset of configs; the size comes from the arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.errors import UnsupportedError
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


INT4_GROUP_SIZES = (32, 64, 128, 256)  # Int4WeightOnlyConfig's documented choices


def _int4_error(weight: torch.Tensor, group_size: int) -> float:
    """Relative error of tinygemm's round trip of ``weight`` (the packed tensor has no
    ``dequantize``): the same choose-qparams / quantize / dequantize primitives it packs with."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    block = (1, group_size)
    scale, zero = _choose_qparams_affine_tinygemm(weight, MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
                                                  scale_dtype=weight.dtype, zero_point_dtype=weight.dtype)
    codes = _quantize_affine_tinygemm(weight, list(block), scale, zero, torch.int32, 0, 15)
    restored = _dequantize_affine_tinygemm(codes, block, scale, zero, torch.int32, 0, 15, output_dtype=weight.dtype)
    return relative_error(restored, weight)


def int4(model: Any, calib: Any, cfg: Any, bits: int | None, group_size: int | None,
         ctx: QuantContext) -> QuantReport:
    """int4 weight-only (``Int4WeightOnlyConfig``, tinygemm tile-packed layout) on CUDA."""
    import torchao
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    assert bits is not None and group_size is not None
    if not str(ctx.device).startswith("cuda") or not torch.cuda.is_available():
        raise UnsupportedError(f"int4 (torchao): tinygemm's int4 kernel runs on CUDA only; this worker's "
                               f"device is {ctx.device}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.bfloat16:
        raise UnsupportedError(f"int4 (torchao): tinygemm computes in bfloat16, the model is {dtype}; "
                               "set the model's dtype: bfloat16")
    layers: list[LayerReport] = []
    padded = 0
    for plan in plan_layers(model, bits, group_size, cfg):
        if not plan.quantized:
            layers.append(kept_report(plan))
            continue
        size = plan.effective_group_size
        if plan.bits != 4 or size not in INT4_GROUP_SIZES or plan.in_features % size:
            raise ValueError(f"torchao int4: {plan.name}: bits {plan.bits}, group size {size} on width "
                             f"{plan.in_features}: int4 takes 4 bits and a group size in {INT4_GROUP_SIZES} "
                             "dividing the width; use largest_divisor, skip_layer or error")
        error = _int4_error(plan.module.weight.detach(), size)
        config = Int4WeightOnlyConfig(group_size=size, int4_packing_format="tile_packed_to_4d",
                                      set_inductor_config=False)
        quantize_(plan.module, config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
        weight = plan.module.weight
        padded += weight.qdata.numel() * weight.qdata.element_size() * 2 - plan.in_features * plan.out_features
        groups = plan.out_features * (plan.in_features // size)
        # scale_and_zero: one (scale, zero) bfloat16 pair per group: zeros counted at 16 bits
        layers.append(quantized_report(plan, scales=groups, zeros=groups, zero_bits=16, error=error,
                                       scale_bits=16))
    return QuantReport(weight_format="torchao-int4", kernel="torchao-int4-tinygemm (aten._weight_int4pack_mm)",
                       layers=layers, engine=f"torchao {torchao.__version__}",
                       extra={"packing": "tile_packed_to_4d, inner_k_tiles 8",
                              "padding_codes": padded})
