"""4-bit NormalFloat (NF4) with bitsandbytes: one absmax per block of ``group_size`` weights.

```yaml
methods:
  - {name: nf4, double_quant: [false, true]}
bits: [4]
group_sizes: [64]
group_fallback: skip_layer       # or error: bitsandbytes blocks run over the flattened weight
```

Each planned ``nn.Linear`` becomes a ``bitsandbytes.nn.Linear4bit`` whose ``Params4bit`` is
quantized with ``blocksize = group_size``; the model computes with the packed codes (two per
byte) and the absmax of each block (float32, or with ``double_quant`` uint8 codes of the
absmax with one float32 absmax per 256 blocks). The checkpoint is written with
``save_pretrained`` and a ``BitsAndBytesConfig`` that transformers reloads on CPU.

Limits found in bitsandbytes 0.50.2:

- block sizes 32, 64, ..., 4096 (``quantize_4bit`` refuses others). A block runs over the
  flattened weight, so a block size that does not divide a row makes blocks that straddle
  rows; such layers can only be kept (``skip_layer``) or refused (``error``). No per-channel
  mode.
- On a CPU with AVX512-BF16 the first forward of a module in eval mode repacks its weight for
  the CPU kernel (``packing_format_for_cpu``; absmax to bfloat16, double quant undone). Saving
  after that writes a checkpoint that no longer matches (``tests/test_nf4.py`` shows it), so
  the checkpoint is saved before any forward pass. The repacking also asserts
  ``out_features % 32 == 0``; modules with other widths (the tiny test model's k/v
  projections) are kept on bitsandbytes' generic path (dequantize, then matmul) by
  ``guard_cpu_kernel``, which a reloaded checkpoint needs too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.layers import LayerPlan, plan_layers
from tasks.quantize.registry import NF4Config
from tasks.quantize.rtn import kept_report, quantized_report, relative_error

BLOCK_SIZES = frozenset({32, 64, 128, 256, 512, 1024, 2048, 4096})
CPU_KERNEL_ROWS = 32  # bitsandbytes' AVX512-BF16 repacking takes out_features in multiples of 32


def guard_cpu_kernel(model: Any) -> int:
    """Keep ``Linear4bit`` modules whose output width the AVX512-BF16 CPU repacking cannot take
    on the generic path; returns how many were."""
    from bitsandbytes.nn import Linear4bit

    guarded = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.out_features % CPU_KERNEL_ROWS:
            guarded += module.support_avx512bf16_for_cpu
            module.support_avx512bf16_for_cpu = False
    return guarded


def nf4_linear(module: torch.nn.Linear, block_size: int, double_quant: bool) -> Any:
    """``module`` as a packed NF4 ``Linear4bit`` computing in the module's dtype."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    weight = module.weight.detach()
    layer = Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                       compute_dtype=weight.dtype, compress_statistics=double_quant, quant_type="nf4",
                       device=weight.device)
    layer.weight = Params4bit(weight.clone(), requires_grad=False, blocksize=block_size,
                              compress_statistics=double_quant, quant_type="nf4", module=layer)
    layer.weight._quantize(weight.device)
    if module.bias is not None:
        layer.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    layer.train(module.training)
    return layer


def _quantize_layer(model: Any, plan: LayerPlan, double_quant: bool) -> LayerReport:
    import bitsandbytes.functional as F

    block_size = plan.effective_group_size
    if plan.fallback is not None or block_size not in BLOCK_SIZES or plan.in_features % block_size:
        raise ValueError(f"nf4: {plan.name}: block size {plan.group_size} on width {plan.in_features} "
                         f"(group_fallback {plan.fallback}): bitsandbytes takes block sizes "
                         f"{sorted(BLOCK_SIZES)} dividing the width; use skip_layer or another size")
    layer = nf4_linear(plan.module, block_size, double_quant)
    with torch.no_grad():  # dequantize_4bit reads the packed weight; it is not a forward pass
        error = relative_error(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                               plan.module.weight)
    report = quantized_report(plan, scales=plan.in_features * plan.out_features // block_size,
                              zeros=0, zero_bits=0, error=error,
                              # absmax: float32, or uint8 codes under double quant (their float32
                              # absmax per 256 blocks and the per-layer code tables are not counted:
                              # about 0.002 bits per weight)
                              scale_bits=8 if double_quant else 32)
    model.set_submodule(plan.name, layer)
    return report


def save_checkpoint(model: Any, directory: Path, double_quant: bool, kept: list[str]) -> int:
    """Write the NF4 model transformers reloads (``from_pretrained(directory)``); returns the
    bytes of its weight files. Must run before any forward pass (see the module docstring)."""
    from transformers import BitsAndBytesConfig

    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=next(model.parameters()).dtype, llm_int8_skip_modules=kept)
    model.save_pretrained(directory)
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


class NF4:
    """bitsandbytes NF4 (packed, computed by bitsandbytes), saved before any forward pass."""

    def quantize(self, model: Any, calib: Any, cfg: NF4Config, bits: int | None,
                 group_size: int | None, ctx: QuantContext) -> QuantReport:
        import bitsandbytes
        from bitsandbytes.functional import has_avx512bf16

        assert bits is not None and group_size is not None
        layers: list[LayerReport] = []
        for plan in plan_layers(model, bits, group_size, cfg):
            if plan.quantized and plan.bits != 4:
                raise ValueError(f"nf4: {plan.name}: bits {plan.bits}; NF4 is 4 bits only")
            layers.append(_quantize_layer(model, plan, cfg.double_quant) if plan.quantized
                          else kept_report(plan))
        guarded = guard_cpu_kernel(model)
        directory = ctx.workdir / "nf4"
        kept = [layer.name for layer in layers if not layer.quantized]
        checkpoint_bytes = save_checkpoint(model, directory, cfg.double_quant, kept)
        on_cpu = ctx.device == "cpu"
        kernel = ("bnb-nf4-cpu-avx512bf16" if on_cpu and has_avx512bf16() else
                  "bnb-nf4-dequant-matmul" if on_cpu else "bnb-nf4-cuda")
        return QuantReport(
            weight_format="bnb-nf4", kernel=kernel, layers=layers,
            checkpoint_dir=str(directory), checkpoint_format="bitsandbytes-nf4",
            checkpoint_bytes=checkpoint_bytes, engine=f"bitsandbytes {bitsandbytes.__version__}",
            extra={"generic_path_layers": guarded} if guarded else {})
