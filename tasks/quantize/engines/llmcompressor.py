"""The llm-compressor engine (vLLM's llm-compressor 0.14, compressed-tensors checkpoints): GPTQ,
AWQ, SmoothQuant W8A8 and FP8 through ``oneshot`` on the given model, with a recipe built from
the cell's config and the layer plan.

```yaml
methods:
  - {name: gptq, engine: llmcompressor, sym: true, damping: 0.01, act_order: false}
  - {name: awq, engine: llmcompressor, sym: false}
  - {name: int8, engine: llmcompressor, smoothing_strength: 0.8}   # W8A8
  - {name: fp8, engine: llmcompressor}                             # FP8 E4M3 weights only
calibration: {dataset: pydoc-topics, samples: 32, seq_len: 256}
```

How the plan maps onto a recipe: every quantized layer is targeted by its exact module name in
one config group per (bits, group size); a layer the plan keeps in dtype (the head, ``keep``
overrides, ``group_fallback: skip_layer``) is targeted by none, so llm-compressor leaves it alone.
``largest_divisor`` is a layer's own group size in its group; ``ragged`` and ``pad`` cannot be
expressed (compressed-tensors requires ``in_features % group_size == 0`` in its quantizer, its
packing and its forward), so the registry declares them unsupported.

What is stored and what is evaluated: the quantized model is saved with
``save_pretrained(save_compressed=True)`` (``pack-quantized``: int32-packed codes, scales in the
model's dtype, bit-packed zero points when asymmetric; ``int-quantized`` int8 / ``naive-quantized``
float8 codes and per-channel scales for W8A8 / FP8) and reloaded with transformers, which
decompresses it: the evaluated model is the checkpoint's reload, computing with dequantized
weights (``fake-quant`` / ``dequantized``; no packed CPU kernel is used).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.layers import LayerPlan, plan_layers
from tasks.quantize.rtn import kept_report, quantized_report, relative_error

log = logging.getLogger(__name__)

def _version() -> str:
    from importlib.metadata import version

    return f"llmcompressor {version('llmcompressor')}"


def _int_weights(bits: int, group_size: int, sym: bool) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size)


def _config_groups(plans: list[LayerPlan], weights: Callable[[int, int], Any],
                   input_activations: Any = None) -> dict[str, Any]:
    """One config group per (bits, group size), targeting its layers by exact name."""
    from compressed_tensors.quantization import QuantizationScheme

    targets: dict[tuple[int, int], list[str]] = {}
    for plan in plans:
        if not plan.quantized:
            continue
        if plan.fallback in ("ragged", "pad"):
            raise ValueError(f"{plan.name}: group_fallback '{plan.fallback}' cannot be expressed in "
                             "compressed-tensors (in_features must be a multiple of the group size); "
                             "use largest_divisor, skip_layer or error")
        targets.setdefault((plan.bits, plan.effective_group_size), []).append(plan.name)
    if not targets:
        raise ValueError("no layer to quantize: every linear layer is kept in dtype by the plan")
    return {f"group_{i}": QuantizationScheme(targets=names, weights=weights(bits, group_size),
                                             input_activations=input_activations)
            for i, ((bits, group_size), names) in enumerate(sorted(targets.items()))}


@contextlib.contextmanager
def _no_pinned_memory_without_accelerator() -> Iterator[None]:
    """AWQ pins its cached activations (``IntermediatesCache.pin_memory``), which raises "Cannot
    access accelerator device" on a machine without one; pinning only speeds host-to-device
    copies, so it is a no-op there for the duration of the call."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _oneshot(model: Any, recipe: list[Any], input_ids: torch.Tensor | None) -> None:
    from llmcompressor import oneshot

    if input_ids is None:
        oneshot(model=model, recipe=recipe)
        return
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(),
                                 "attention_mask": torch.ones_like(input_ids).tolist()})
    with _no_pinned_memory_without_accelerator():
        oneshot(model=model, recipe=recipe, dataset=dataset, num_calibration_samples=input_ids.shape[0],
                max_seq_length=input_ids.shape[1], shuffle_calibration_samples=False)


def _layer_reports(model: Any, plans: list[LayerPlan], originals: dict[str, torch.Tensor],
                   zero_bits: int) -> list[LayerReport]:
    """Per layer: codes, scales and zero points as compressed-tensors stores them, and the error
    of the weight the layer computes with (compressed-tensors' own quantize-dequantize) against the
    weight it held before quantization (after any smoothing / AWQ scaling)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    modules = dict(model.named_modules())
    reports = []
    for plan in plans:
        if not plan.quantized:
            reports.append(kept_report(plan))
            continue
        module = modules[plan.name]
        scale = module.weight_scale.detach()
        zero_point = getattr(module, "weight_zero_point", None)
        with torch.no_grad():
            held = module.weight.detach()
            dequantized = fake_quantize(held, scale, zero_point, module.quantization_scheme.weights)
        reference = originals.get(plan.name, held)
        reports.append(quantized_report(
            plan, scale.numel(), scale.numel() if zero_bits else 0, zero_bits,
            relative_error(dequantized, reference), scale_bits=scale.element_size() * 8))
    return reports


def _save_and_reload(model: Any, ctx: QuantContext) -> tuple[Any, Path, int]:
    """Save the compressed checkpoint (+ tokenizer) and reload it with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    directory = Path(ctx.workdir) / "llmcompressor"
    dtype = next(model.parameters()).dtype
    model.save_pretrained(directory, save_compressed=True)
    AutoTokenizer.from_pretrained(ctx.model_path).save_pretrained(directory)
    size = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    # dequantize=True: decompressed at load, not on the first forward (a compressed-tensors hook),
    # so that the model's parameters are the dense weights it computes with from the start
    reloaded = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)).to(ctx.device).eval()
    return reloaded, directory, size


def _finish(model: Any, plans: list[LayerPlan], originals: dict[str, torch.Tensor], zero_bits: int,
            ctx: QuantContext, extra: dict[str, Any]) -> QuantReport:
    layers = _layer_reports(model, plans, originals, zero_bits)
    reloaded, directory, size = _save_and_reload(model, ctx)
    stored = json.loads((directory / "config.json").read_text())["quantization_config"]
    formats = sorted({group["format"] for group in stored["config_groups"].values()})
    extra = {"compressed_tensors_format": ",".join(formats),
             "evaluated": "the checkpoint reloaded by transformers (decompressed to dense weights)"} | extra
    return QuantReport(weight_format="fake-quant", kernel="dequantized", layers=layers,
                       extra=extra, model=reloaded, checkpoint_dir=str(directory),
                       checkpoint_format="compressed-tensors", checkpoint_bytes=size, engine=_version())


def _weight_clones(plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    return {plan.name: plan.module.weight.detach().clone() for plan in plans if plan.quantized}


def gptq(model: Any, calib: Any, cfg: Any, bits: int | None, group_size: int | None,
         ctx: QuantContext) -> QuantReport:
    """GPTQModifier: ``damping`` → ``dampening_frac``; ``act_order`` → ``actorder: static``
    (columns in decreasing Hessian-diagonal order, groups kept contiguous: no g_idx stored).
    Calibration runs llm-compressor's sequential pipeline: each decoder layer sees the outputs
    of the already-quantized ones; the linear layers inside one decoder layer share its inputs
    (``true_sequential`` within a block is not available in llm-compressor and is recorded)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    assert bits is not None and group_size is not None and calib is not None
    plans = plan_layers(model, bits, group_size, cfg)
    groups = _config_groups(plans, lambda b, g: _int_weights(b, g, cfg.sym))
    originals = _weight_clones(plans)  # GPTQ writes the quantized weights in place
    modifier = GPTQModifier(config_groups=groups, dampening_frac=cfg.damping,
                            actorder="static" if cfg.act_order else None)
    _oneshot(model, [modifier], calib.data.input_ids)
    return _finish(model, plans, originals, 0 if cfg.sym else bits, ctx, {
        "actorder": "static" if cfg.act_order else None,
        "static_groups": "scales and zero points from the unquantized weights (observer before GPTQ)",
        "sequential": "per decoder layer (true_sequential inside a block not available)"})


def awq(model: Any, calib: Any, cfg: Any, bits: int | None, group_size: int | None,
        ctx: QuantContext) -> QuantReport:
    """AWQModifier (per-channel scales searched on calibration activations, llm-compressor's
    default mappings for the architecture) followed by QuantizationModifier (round to nearest
    with the scaled weights' min/max)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    assert bits is not None and group_size is not None and calib is not None
    plans = plan_layers(model, bits, group_size, cfg)
    groups = _config_groups(plans, lambda b, g: _int_weights(b, g, cfg.sym))
    _oneshot(model, [AWQModifier(mappings=_awq_mappings(model, plans)), QuantizationModifier(config_groups=groups)],
             calib.data.input_ids)
    return _finish(model, plans, {}, 0 if cfg.sym else bits, ctx, {})


def _awq_mappings(model: Any, plans: list[LayerPlan]) -> list[Any] | None:
    """llm-compressor's mappings for the architecture, or, when the plan keeps some balance layers
    in dtype, those mappings resolved to module names without the sets whose balance layers are
    all kept (llm-compressor 0.14 divides by zero on them: ``_compute_layer_means``)."""
    from compressed_tensors.utils import match_modules_set
    from llmcompressor.modifiers.transform.awq import AWQMapping, get_layer_mappings_from_model

    quantized = {plan.name for plan in plans if plan.quantized}
    if all(plan.quantized for plan in plans if plan.reason != "output head kept in dtype"):
        return None
    names = {module: name for name, module in model.named_modules()}
    mappings = []
    for mapping in get_layer_mappings_from_model(model):
        for smooth, *balance in match_modules_set(model, (mapping.smooth_layer, *mapping.balance_layers)):
            balance_names = [names[module] for group in balance for module in group]
            if any(name in quantized for name in balance_names):
                mappings.append(AWQMapping(names[smooth[0]], balance_names, mapping.activation_hook_target))
    return mappings


def _eight_bit_plans(model: Any, bits: int | None, group_size: int | None, cfg: Any,
                     method: str) -> list[LayerPlan]:
    if bits not in (None, 8) or group_size not in (None, -1):
        raise ValueError(f"{method} (llmcompressor) is 8-bit with one scale per output channel: "
                         f"bits 8 and group_size -1, not bits={bits} group_size={group_size}")
    plans = plan_layers(model, 8, -1, cfg)
    wrong = [plan.name for plan in plans if plan.quantized and plan.bits != 8]
    if wrong:
        raise ValueError(f"{method} (llmcompressor): overrides may only keep layers, not change bits "
                         f"({', '.join(wrong[:3])})")
    return plans


def int8(model: Any, calib: Any, cfg: Any, bits: int | None, group_size: int | None,
         ctx: QuantContext) -> QuantReport:
    """W8A8: SmoothQuantModifier(smoothing_strength) moves activation outliers into the weights,
    then QuantizationModifier gives int8 weights (symmetric, one scale per output channel) and
    dynamic per-token int8 activations; the model computes with both quantized (QDQ).

    The int8 method is calibration-free for torchao; this engine declares ``needs_calibration``,
    so its cells carry the spec's calibration (identity, tokens and hash in the row) and
    SmoothQuant measures its activations on it. With ``smoothing_strength: 0`` SmoothQuant is not
    run and the calibration is unused."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    plans = _eight_bit_plans(model, bits, group_size, cfg, "int8")
    activations = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    groups = _config_groups(plans, lambda b, g: _int_weights(8, -1, True), input_activations=activations)
    recipe: list[Any] = [QuantizationModifier(config_groups=groups)]
    extra: dict[str, Any] = {"smoothing_strength": cfg.smoothing_strength}
    input_ids = None
    if cfg.smoothing_strength > 0:
        if calib is None:
            raise ValueError("int8 (llmcompressor): SmoothQuant needs the cell's calibration; none was given")
        input_ids = calib.data.input_ids
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=cfg.smoothing_strength))
        extra |= {"smoothquant_calibration": calib.data.spec}
    _oneshot(model, recipe, input_ids)
    report = _finish(model, plans, {}, 0, ctx, extra)
    report.activations = "int8 dynamic per token"
    return report


def fp8(model: Any, calib: Any, cfg: Any, bits: int | None, group_size: int | None,
        ctx: QuantContext) -> QuantReport:
    """FP8 E4M3 weights, symmetric, one scale per output channel, activations left in the model's
    dtype (weight-only; no preset: llm-compressor's FP8_DYNAMIC would also quantize activations).
    Data-free: the scales come from the weights."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.quantization import QuantizationModifier

    plans = _eight_bit_plans(model, bits, group_size, cfg, "fp8")
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    groups = _config_groups(plans, lambda b, g: weights)
    _oneshot(model, [QuantizationModifier(config_groups=groups)], None)
    return _finish(model, plans, {}, 0, ctx, {})
