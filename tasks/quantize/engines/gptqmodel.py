"""GPTQ and AWQ through GPTQModel: quantize from the base model's folder, save a packed
checkpoint in the group's scratch folder, reload it with GPTQModel's torch kernel and evaluate
that packed model. On CUDA the per-layer record is read from that torch-kernel load, and the
checkpoint is then reloaded with ``BACKEND.AUTO`` (the kernel GPTQModel picks for the GPU:
Marlin, ExLlama v2, Triton...), which evaluates; ``kernel`` names the QuantLinear classes that
ran (``auto: MarlinLinear x210``).

```yaml
methods:
  - {name: gptq, engine: gptqmodel, sym: true, damping: 0.01, act_order: false}
  - {name: awq, engine: gptqmodel, sym: false}
bits: [4]
group_sizes: [32, 64, 128]
calibration: {dataset: pydoc-topics, samples: 32, seq_len: 256}
```

The layer plan (``tasks.quantize.layers``) maps onto GPTQModel's per-module ``dynamic``
overrides (exact-name regexes): a layer kept in dtype gets ``-:^name$``; a layer whose bits or
group size differ from the cell's (an override, or ``largest_divisor``'s divisor) gets
``+:^name$: {bits, group_size}``. GPTQ's ``g_idx = column // group_size`` gives a ragged last
group natively (576 at 128: scales have ``ceil(576/128) = 5`` rows, ``4x128+64``); GPTQModel
cannot pad a layer (the packed width is the layer's width), so ``pad`` is not offered.

Sizes: a GPTQ checkpoint stores per layer ``qweight`` (codes, packed in int32), ``scales``
(fp16, one per group and output), ``qzeros`` (``bits`` per group and output, also for
symmetric layers, where it holds the constant midpoint) and ``g_idx`` (one int32 per input
column). ``g_idx`` is counted as two fp16 scale equivalents per input column, so the packed
arithmetic matches the checkpoint's bytes. AWQ (GEMM) stores ``qweight``, ``qzeros`` and
``scales`` (no ``g_idx``).

AWQ on CPU (what was checked, see the report of the commit that added this): the default packer
(AWQ_GEMM) needs CUDA, so AWQ is packed and run with ``awq_torch``. 3-bit GEMM packing is a
continuous little-endian bit stream (``packing_utils._pack_contiguous``); on a 2-layer Llama with
hidden 128 the unpacked codes stay in [0, 7], zeros in range, and AWQ's 3-bit and 4-bit logits
are closer to the base model's than rtn's (0.24 vs 0.36 and 0.146 vs 0.187 relative error).
Not the identity: GPTQModel's scale search uses ``duo_scaling`` (``s = x_mean**r /
w_mean**(1-r)``, r in 0..0.95), so r = 0 gives ``1/w_mean``, not ``s = 1``; the candidates do not
include "no scaling", and AWQ can lose to round-to-nearest on its own objective. llm-compressor
0.14's AWQModifier, with the same duo scaling, puts ``(ratio 0, no duo scaling)`` = identity
first in its grid for exactly this reason (``_get_grid_search_params``). GPTQModel then runs a
clip search per group (``apply_clip``; q/k projections excluded) that llm-compressor does not,
and searches in the dtype it loaded (bfloat16 for a float32 model). AWQ also needs
``in_features % group_size == 0`` and (clip search) ``out_features % 64 == 0``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.layers import LayerPlan, is_head, plan_layers
from tasks.quantize.registry import AWQConfig, GPTQConfig
from tasks.quantize.rtn import kept_report, quantized_report, relative_error

log = logging.getLogger(__name__)
VERSION = "7.6.0"
GPTQ_BACKEND = "gptq_torch"
AWQ_BACKEND = "awq_torch"
AUTO_BACKEND = "auto"  # on CUDA: the kernel GPTQModel selects for the GPU evaluates the checkpoint


def gptq(model: Any, calib: Any, cfg: GPTQConfig, bits: int | None, group_size: int | None,
         ctx: QuantContext) -> QuantReport:
    """GPTQ with GPTQModel; packed ``gptq`` checkpoint, evaluated with the ``gptq_torch`` kernel."""
    from gptqmodel import QuantizeConfig

    assert bits is not None and group_size is not None
    plans = plan_layers(model, bits, group_size, cfg)
    quant_config = QuantizeConfig(bits=bits, group_size=group_size, sym=cfg.sym, desc_act=cfg.act_order,
                                  damp_percent=cfg.damping, true_sequential=cfg.true_sequential,
                                  act_group_aware=cfg.act_group_aware, static_groups=cfg.static_groups,
                                  dynamic=dynamic_overrides(plans, bits, group_size) or None)
    return _quantize(model, calib, plans, quant_config, "gptq", GPTQ_BACKEND, ctx)


def awq(model: Any, calib: Any, cfg: AWQConfig, bits: int | None, group_size: int | None,
        ctx: QuantContext) -> QuantReport:
    """AWQ with GPTQModel; packed ``awq`` (GEMM layout) checkpoint, ``awq_torch`` kernel."""
    from gptqmodel import QuantizeConfig

    assert bits is not None and group_size is not None
    plans = plan_layers(model, bits, group_size, cfg)
    dynamic = dynamic_overrides(plans, bits, group_size)
    if dynamic:
        # measured on SmolLM2 at g128 with skip_layer (gate/up kept, down_proj quantized): GPTQModel
        # 7.6 scales post_attention_layernorm with down_proj's 1536 scales, and its worker thread's
        # error kills the process
        raise ValueError(f"GPTQModel AWQ quantizes every decoder linear layer at one bits / group size; "
                         f"the plan changes {len(dynamic)} layers (e.g. {next(iter(dynamic))}), which breaks "
                         "its scaling groups: use group_fallback error, no overrides, or engine llmcompressor")
    quant_config = QuantizeConfig(bits=bits, group_size=group_size, sym=cfg.sym, method="awq",
                                  format="gemm", dynamic=None)
    return _quantize(model, calib, plans, quant_config, "awq", AWQ_BACKEND, ctx)


def dynamic_overrides(plans: list[LayerPlan], bits: int, group_size: int) -> dict[str, dict[str, int]]:
    """GPTQModel ``dynamic`` entries that make it follow the layer plan (exact-name regexes)."""
    dynamic: dict[str, dict[str, int]] = {}
    for plan in plans:
        if plan.bits == 3 and plan.out_features % 32:
            raise ValueError(f"{plan.name}: 3-bit GPTQ/AWQ packing stores 32 output columns per 3 int32 "
                             f"words; out_features={plan.out_features} is not a multiple of 32 (use "
                             "2/4/8 bits or keep the layer with an override)")
        pattern = f"^{re.escape(plan.name)}$"
        if is_head(plan.name):
            if plan.quantized:
                raise ValueError(f"override '{plan.override}' quantizes the output head {plan.name}; "
                                 "the gptqmodel engine keeps the head in dtype (remove the override)")
            continue  # GPTQModel leaves the head alone (lm_head=False)
        if not plan.quantized:
            dynamic[f"-:{pattern}"] = {}
        elif plan.bits != bits or plan.effective_group_size != group_size:
            dynamic[f"+:{pattern}"] = {"bits": plan.bits, "group_size": plan.effective_group_size}
    return dynamic


def calibration_rows(calib: Any) -> list[dict[str, list[int]]]:
    """GPTQModel's calibration format: one {input_ids, attention_mask} per window."""
    if calib is None:
        raise ValueError("gptqmodel engine needs calibration data (set calibration: in the spec)")
    return [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib.data.input_ids]


def set_cpu_workers(threads: int) -> None:
    # GPTQModel builds its CPU thread pool once, from this variable, with a 2-worker loader
    # sub-pool: fewer than 2 workers fails ("requests 2 workers but parent 'cpu' only has 1").
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, threads))


def _quantize(model: Any, calib: Any, plans: list[LayerPlan], quant_config: Any, fmt: str, backend: str,
              ctx: QuantContext) -> QuantReport:
    set_cpu_workers(ctx.threads)
    from gptqmodel import BACKEND, GPTQModel

    dtype = eval_dtype(next(model.parameters()).dtype)  # the checkpoint holds what is evaluated
    quantizer = GPTQModel.load(ctx.model_path, quant_config, device=ctx.device, dtype=dtype)
    # the backend also picks the packer: AWQ's default (AWQ_GEMM) needs CUDA
    quantizer.quantize(calibration_rows(calib), batch_size=1, backend=BACKEND(backend))
    checkpoint = Path(ctx.workdir) / f"{fmt}-checkpoint"
    quantizer.save(str(checkpoint))
    del quantizer
    packed = load_packed(checkpoint, backend, ctx.device, dtype)
    layers = layer_reports(plans, packed, fmt)
    kernel, evaluated = backend, {}
    if str(ctx.device).startswith("cuda"):
        # The per-layer record comes from the torch kernel's modules (qzeros, dequantize_weight);
        # the model evaluated is the checkpoint reloaded with the kernel GPTQModel picks for this
        # GPU (Marlin, ExLlama v2, Triton...), which repacks the weights its own way.
        del packed
        torch.cuda.empty_cache()
        packed = load_packed(checkpoint, AUTO_BACKEND, ctx.device, dtype)
        classes = kernel_classes(packed)
        kernel = "auto: " + ", ".join(f"{name} x{count}" for name, count in sorted(classes.items()))
        evaluated = {"kernel_classes": classes, "layer_reports_from": f"the checkpoint loaded with {backend}"}
    return QuantReport(
        weight_format=fmt, kernel=kernel, layers=layers, model=packed,
        checkpoint_dir=str(checkpoint), checkpoint_format=fmt,
        checkpoint_bytes=sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")),
        engine=f"gptqmodel {VERSION}",
        extra={"quantize_config": json.loads((checkpoint / "quantize_config.json").read_text()),
               "compute_dtype": str(dtype).removeprefix("torch."), **evaluated})


def kernel_classes(packed: Any) -> dict[str, int]:
    """How many of the model's modules each GPTQModel QuantLinear class computes (the kernel
    that ran: ``MarlinLinear``, ``ExllamaV2Linear``, ``TritonV2Linear``, ``TorchLinear``...)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    counts: dict[str, int] = {}
    for module in packed.modules():
        if isinstance(module, BaseQuantLinear):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def eval_dtype(dtype: torch.dtype) -> torch.dtype:
    """The packed model's dtype: GPTQModel's torch kernels compute in float16 or bfloat16 only
    ("TorchLinear only supports [float16, bfloat16]"); a float32 model is evaluated in bfloat16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def load_packed(checkpoint: Path, backend: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """The saved checkpoint reloaded with GPTQModel's kernel ``backend``: the HF model inside
    GPTQModel's wrapper, its linear layers packed modules."""
    from gptqmodel import BACKEND, GPTQModel

    wrapper = GPTQModel.load(str(checkpoint), backend=BACKEND(backend), device=device,
                             **({"dtype": dtype} if dtype is not None else {}))
    return wrapper.model.eval()


def layer_reports(plans: list[LayerPlan], packed: Any, fmt: str) -> list[LayerReport]:
    """One report per planned layer, sizes from the packed module's own tensors."""
    modules = dict(packed.named_modules())
    reports = []
    for plan in plans:
        module = modules.get(plan.name)
        if not plan.quantized or isinstance(module, torch.nn.Linear):
            reports.append(kept_report(plan))
            continue
        scales = module.scales.numel()
        if getattr(module, "g_idx", None) is not None and fmt == "gptq":
            scales += 2 * module.g_idx.numel()  # int32 column -> group index = two fp16 equivalents
        zeros = module.qzeros.numel() * 32 // plan.bits if plan.bits else 0
        with torch.no_grad():
            deq = dequantized_weight(module)
        # AWQ's packed weight is Q(W * s) with 1/s folded into the previous op: not comparable
        # with W, so no weight error is reported for it.
        error = relative_error(deq, plan.module.weight) if fmt == "gptq" else None
        reports.append(quantized_report(plan, scales, zeros, plan.bits, error))
    return reports


def dequantized_weight(module: Any) -> torch.Tensor:
    """[out, in] float32 weight a packed GPTQModel module computes with, unpacked by the
    kernel's own dequantization."""
    if hasattr(module, "dequantize_weight"):  # GPTQ torch kernel: [in, out]
        return module.dequantize_weight().T.float()
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size).T.float()
