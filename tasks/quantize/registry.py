"""The one method registry: names, capabilities and typed configs, imported lazily.

Adding a method = one module in this package + one entry in ``METHODS``. The registry stores
``"module:attr"`` strings and imports the implementation on first use, so listing and
validating methods never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, get_args

from tasks.naming import did_you_mean
from tasks.quantize.configs import (  # noqa: F401 - the configs are part of the registry's interface
    AWQConfig,
    BaselineConfig,
    FP8Config,
    GPTQConfig,
    GroupFallback,
    GSQConfig,
    HQQConfig,
    Int4Config,
    Int8Config,
    LayerOverride,
    MagnitudeConfig,
    MethodConfig,
    NF4Config,
    PruneConfig,
    PruneStage,
    RTNConfig,
    SparseGPTConfig,
    WandaConfig,
    WeightQuantConfig,
)

ALL_FALLBACKS = frozenset(get_args(GroupFallback))
_GPTQMODEL_PRUNE = ("GPTQModel quantizes the base model it loads from its folder, not the pruned "
                    "model; use engine: llmcompressor")
_PRUNE_NOTE = ("every linear layer but the output head is pruned; an N:M pattern runs along input "
               "columns, so a layer whose input width M does not divide is left dense (its record says "
               "so). Stored in compressed-tensors' sparse-bitmask layout (values, a bit per weight, row "
               "offsets), written by qsweep because compressed-tensors 0.19 no longer has sparse "
               "compressors; evaluated with the weights decompressed (no sparse kernel)")


def _pruning(name: str, target: str, config: type, calibrated: bool, description: str) -> MethodInfo:
    """A pruning method (``target`` its class in tasks.quantize.prune): no bits, no group size;
    the sparsity is a parameter (a list of them an axis)."""
    return MethodInfo(name=name, target=f"tasks.quantize.prune:{target}",
                      config=config, version="1", description=description, uses_bits=False,
                      uses_group_size=False, needs_calibration=calibrated,
                      capabilities=Capabilities(bits=frozenset(), packed_format="sparse-bitmask", note=_PRUNE_NOTE))


@dataclass(frozen=True)
class Capabilities:
    """What one method (or one engine of it) can do; preflight skips cells outside it, with the
    reason, before any model is loaded."""

    bits: frozenset[int]
    group_sizes: frozenset[int] | None = None  # None: any positive size
    per_channel: bool = True  # group_size -1 = one scale per output channel
    fallbacks: frozenset[str] = ALL_FALLBACKS
    overrides: bool = True  # per-layer bits / group size / keep
    packed_format: str | None = None  # None: the quantized model is held dequantized
    needs_calibration: bool = False  # this engine calibrates even where its method does not
    # its kernel exists on CUDA only: a cell is skipped on a worker without a GPU (judged there)
    requires_cuda: bool = False
    # can follow a pruning stage (``prune:``): quantizes the model it is given, in place or by
    # oneshot, with nothing computed from the unpruned model beforehand
    prune_stage: bool = True
    prune_note: str = ""  # why not, where it cannot
    note: str = ""  # why the limits are what they are

    def unsupported(self, bits: int | None, group_size: int | None, fallback: str | None,
                    non_divisible: dict[str, int], has_overrides: bool, pruned: bool = False) -> str | None:
        """Why a cell is outside these capabilities, or None."""
        if pruned and not self.prune_stage:
            return f"cannot follow a prune stage ({self.prune_note})"
        if bits is not None and self.bits and bits not in self.bits:
            return f"supports bits {{{', '.join(map(str, sorted(self.bits)))}}}, not {bits}"
        if group_size == -1 and not self.per_channel:
            return "has no per-output-channel mode (group_size -1)"
        if group_size not in (None, -1) and self.group_sizes is not None and group_size not in self.group_sizes:
            if not self.group_sizes:
                return f"takes one scale per output channel only (group_size -1), not group size {group_size}"
            return (f"supports group sizes {{{', '.join(map(str, sorted(self.group_sizes)))}}}, "
                    f"not {group_size}")
        if non_divisible and fallback not in self.fallbacks:
            shown = ", ".join(f"{k}={v}" for k, v in non_divisible.items())
            return (f"cannot apply group_fallback={fallback} (group size {group_size} does not divide "
                    f"{shown}); it can: {', '.join(sorted(self.fallbacks))}")
        if has_overrides and not self.overrides:
            return "cannot apply per-layer overrides"
        return None


@dataclass(frozen=True)
class MethodInfo:
    """What a method is and can do; validation reads these flags, never the method's name."""

    name: str
    target: str  # "module:attr" of the QuantMethod implementation
    config: type[MethodConfig]
    version: str
    description: str
    uses_bits: bool = True
    uses_group_size: bool = True
    needs_calibration: bool = False
    capabilities: Capabilities = Capabilities(bits=frozenset())
    # engine name -> its capabilities, for methods whose config has an ``engine`` field
    engines: dict[str, Capabilities] | None = None
    in_place: bool = True  # changes the model's weights, so it gets a copy of the base model
    # reads the per-layer input statistics (mean |x|, X^T X) of the calibration windows: an
    # in x in float32 matrix per linear layer (39 GB for Llama-3.1-8B), computed only for these
    needs_activation_stats: bool = False
    packages: tuple[str, ...] = ()  # importable modules it needs (checked before any cell runs)

    def caps(self, params: dict[str, Any]) -> Capabilities:
        """The capabilities of this method with these parameters (its engine's, if it has engines)."""
        if self.engines is not None:
            return self.engines[params["engine"]]
        return self.capabilities

    def calibrated(self, params: dict[str, Any]) -> bool:
        """Whether a cell of this method with these parameters carries the spec's calibration
        (and so records its identity, size and hash in the row): the method, its engine, or a
        prune stage before it needs one."""
        stage = params.get("prune")
        return (self.needs_calibration or self.caps(params).needs_calibration
                or bool(stage) and METHODS[stage["method"]].needs_calibration)

    @property
    def packed_format(self) -> str | None:
        return self.capabilities.packed_format

    def load(self) -> Any:
        module_name, attr = self.target.split(":")
        return getattr(importlib.import_module(module_name), attr)


METHODS: dict[str, MethodInfo] = {
    "baseline": MethodInfo(
        name="baseline",
        target="tasks.quantize.baseline:Baseline",
        config=BaselineConfig,
        version="1",
        description="unquantized model in its dtype",
        uses_bits=False,
        uses_group_size=False,
        capabilities=Capabilities(bits=frozenset(), packed_format="dense"),
        in_place=False,
    ),
    "rtn": MethodInfo(
        name="rtn",
        target="tasks.quantize.rtn:RTN",
        config=RTNConfig,
        version="1",
        description="round-to-nearest group quantization (torch, fake-quant)",
        capabilities=Capabilities(bits=frozenset(range(2, 9))),
    ),
    "gsq": MethodInfo(
        name="gsq",
        target="tasks.quantize.gsq:GSQ",
        config=GSQConfig,
        version="1",
        description="group scaling quantization: activation-aware input-channel scales searched "
                    "on calibration data, then rtn's group quantizer (torch, fake-quant)",
        needs_calibration=True,
        needs_activation_stats=True,
        capabilities=Capabilities(bits=frozenset(range(2, 9)), prune_stage=False,
                                  prune_note="its input-channel scales come from activation statistics "
                                             "the actor measured on the unpruned model"),
    ),
    # Engine-backed methods: capabilities are each engine's measured reach (see the engine
    # modules in tasks/quantize/engines/ for how each limit was found).
    "gptq": MethodInfo(
        name="gptq",
        target="tasks.quantize.engines:GPTQ",
        config=GPTQConfig,
        version="1",
        description="GPTQ via GPTQModel or llm-compressor (packed checkpoint)",
        needs_calibration=True,
        engines={
            "gptqmodel": Capabilities(
                bits=frozenset({2, 3, 4, 8}), group_sizes=frozenset({16, 32, 64, 128, 256, 512, 1024}),
                fallbacks=frozenset({"ragged", "skip_layer", "error"}), packed_format="gptq",
                prune_stage=False, prune_note=_GPTQMODEL_PRUNE,
                note="GPTQModel 7.6 GPTQ, reloaded with the gptq_torch kernel (TorchLinear: group sizes "
                     "-1/16..1024, fp16/bf16 only). Ragged is native (g_idx = column // group size; 576 at "
                     "128 stores 5 scale rows). largest_divisor's sizes (48, 96) are not kernel group "
                     "sizes; pad would change the packed width. 3-bit packs zeros 32 output columns at a "
                     "time: every quantized layer's out_features must be a multiple of 32. 5-7 bits untried."),
            "llmcompressor": Capabilities(
                bits=frozenset(range(2, 9)), per_channel=True,
                fallbacks=frozenset({"largest_divisor", "skip_layer", "error"}),
                note="compressed-tensors pack-quantized packs 1-8-bit ints (2-8 measured on the tiny "
                     "Llama); any group size dividing a layer's width, or -1; widths it does not divide "
                     "are refused (quantizer, packing, forward), so no ragged or pad; largest_divisor = "
                     "a per-layer config group, skip_layer = layer not targeted; scales in the model "
                     "dtype; evaluated as the checkpoint reloaded dequantized"),
        },
    ),
    "awq": MethodInfo(
        name="awq",
        target="tasks.quantize.engines:AWQ",
        config=AWQConfig,
        version="1",
        description="AWQ via GPTQModel or llm-compressor",
        needs_calibration=True,
        engines={
            "gptqmodel": Capabilities(
                bits=frozenset({4}), group_sizes=frozenset({16, 32, 64, 128}), per_channel=False,
                fallbacks=frozenset({"error"}), overrides=False, packed_format="awq",
                prune_stage=False, prune_note=_GPTQMODEL_PRUNE,
                note="GPTQModel 7.6 AWQ (GEMM format), packed with and reloaded on the awq_torch kernel "
                     "(AWQ_GEMM needs CUDA). AWQ asserts in_features % group_size == 0 (no ragged, no "
                     "pad; largest_divisor's sizes are not kernel group sizes) and its clip search needs "
                     "out_features % 64 == 0. Layers left in dtype (skip_layer, overrides) break its "
                     "scaling groups: with gate/up kept, down_proj's scales are applied to "
                     "post_attention_layernorm (576 vs 1536) and the process dies. See "
                     "tasks/quantize/engines/gptqmodel.py for 3-bit."),
            "llmcompressor": Capabilities(
                bits=frozenset(range(2, 9)), per_channel=True,
                fallbacks=frozenset({"largest_divisor", "skip_layer", "error"}),
                note="compressed-tensors pack-quantized packs 1-8-bit ints (2-8 measured on the tiny "
                     "Llama); any group size dividing a layer's width, or -1; widths it does not divide "
                     "are refused (quantizer, packing, forward), so no ragged or pad; largest_divisor = "
                     "a per-layer config group, skip_layer = layer not targeted; scales in the model "
                     "dtype; evaluated as the checkpoint reloaded dequantized"),
        },
    ),
    # Pruning: no bits, no group size; the sparsity is a parameter (a list of them an axis).
    "sparsegpt": _pruning("sparsegpt", "SparseGPT", SparseGPTConfig, True,
                          "SparseGPT pruning, unstructured or N:M (llm-compressor SparseGPTModifier)"),
    "wanda": _pruning("wanda", "Wanda", WandaConfig, True,
                      "Wanda pruning (|w| x input norm), unstructured or N:M (llm-compressor WandaPruningModifier)"),
    "magnitude": _pruning("magnitude", "Magnitude", MagnitudeConfig, False,
                          "magnitude pruning, unstructured or N:M, data-free (torch: llm-compressor's "
                          "MagnitudePruningModifier masks during training steps and prunes nothing in oneshot)"),
    "hqq": MethodInfo(
        name="hqq",
        target="tasks.quantize.hqq:HQQ",
        config=HQQConfig,
        version="1",
        description="half-quadratic quantization, calibration-free (hqq library)",
        capabilities=Capabilities(
            bits=frozenset({1, 2, 3, 4, 8}), packed_format="hqq",
            fallbacks=frozenset({"largest_divisor", "skip_layer", "error"}),
            note="hqq 0.2.8 HQQLinear, axis 1, torch backend (dequantize per forward). Any group "
                 "size dividing the width (hqq reshapes to [-1, g]: a non-dividing size would make "
                 "groups straddling rows, so no ragged/pad). Packs 8/4/2/1 bits in uint8 and 3 bits "
                 "10 per int32 (3.2 bits per code, and sizes count them as stored); 5/6 bits are one "
                 "byte per code, not offered. Scale and zero per group in 16 bits. No checkpoint: "
                 "transformers 5 cannot load HQQ on CPU."),
    ),
    "int8": MethodInfo(
        name="int8",
        target="tasks.quantize.engines:Int8",
        config=Int8Config,
        version="1",
        description="int8 weight-only (torchao) or W8A8 with SmoothQuant (llm-compressor)",
        engines={
            "torchao": Capabilities(
                bits=frozenset({8}), packed_format="torchao-int8",
                fallbacks=frozenset({"largest_divisor", "skip_layer", "error"}),
                note="torchao 0.18 Int8WeightOnlyConfig: PerRow (-1) or PerGroup(g), g must divide "
                     "the width (torchao asserts); int8 codes, fp32 scale and int8 zero point (0) "
                     "per row/group; no checkpoint"),
            "llmcompressor": Capabilities(
                bits=frozenset({8}), group_sizes=frozenset(), needs_calibration=True,
                note="W8A8: SmoothQuant (calibrated on the spec's calibration), then int8 weights with "
                     "one scale per output channel (group_size -1 only) and dynamic per-token int8 "
                     "activations; overrides may only keep layers; int-quantized checkpoint evaluated "
                     "reloaded dequantized (activations QDQ)"),
        },
    ),
    "int4": MethodInfo(
        name="int4",
        target="tasks.quantize.engines:Int4",
        config=Int4Config,
        version="1",
        description="int4 weight-only, packed for a CUDA kernel (torchao tinygemm)",
        engines={
            "torchao": Capabilities(
                bits=frozenset({4}), group_sizes=frozenset({32, 64, 128, 256}), per_channel=False,
                fallbacks=frozenset({"largest_divisor", "skip_layer", "error"}), packed_format="torchao-int4",
                requires_cuda=True,
                note="torchao 0.18 Int4WeightOnlyConfig, tile_packed_to_4d: tinygemm's "
                     "aten._weight_int4pack_mm, CUDA compute capability >= 8.0, bfloat16 models only; "
                     "asymmetric codes, a bfloat16 scale and float zero per group of 32/64/128/256 "
                     "dividing the width; widths padded to 1024 in memory; no checkpoint"),
        },
    ),
    "fp8": MethodInfo(
        name="fp8",
        target="tasks.quantize.engines:FP8",
        config=FP8Config,
        version="1",
        description="FP8 E4M3 weights (torchao, or llm-compressor: weight-only, activations unquantized)",
        engines={
            "torchao": Capabilities(
                bits=frozenset({8}), packed_format="torchao-fp8",
                fallbacks=frozenset({"largest_divisor", "skip_layer", "error"}),
                note="torchao 0.18 Float8WeightOnlyConfig (E4M3): runs on CPU by dequantizing per "
                     "forward; PerRow (-1) or PerGroup(g), g dividing the width; fp32 scale per "
                     "row/group; no checkpoint"),
            "llmcompressor": Capabilities(
                bits=frozenset({8}), group_sizes=frozenset(),
                note="weight-only FP8 E4M3 with one scale per output channel (group_size -1 only; "
                     "activations not quantized); overrides may only keep layers; naive-quantized "
                     "checkpoint evaluated reloaded dequantized"),
        },
    ),
    "nf4": MethodInfo(
        name="nf4",
        target="tasks.quantize.nf4:NF4",
        config=NF4Config,
        version="1",
        description="4-bit NormalFloat, bitsandbytes",
        capabilities=Capabilities(
            bits=frozenset({4}), packed_format="bnb-nf4",
            group_sizes=frozenset({32, 64, 128, 256, 512, 1024, 2048, 4096}), per_channel=False,
            fallbacks=frozenset({"skip_layer", "error"}),
            note="bitsandbytes 0.50.2 quantize_4bit block sizes; blocks run over the flattened "
                 "weight, so a block size must divide the width (else keep the layer); fp32 absmax "
                 "per block (uint8 with double_quant); checkpoint saved before any forward"),
    ),
}


class UnknownMethod(KeyError):
    pass


def get_method(name: str) -> MethodInfo:
    """Look a method up by name; a miss says what is close and what exists."""
    if name in METHODS:
        return METHODS[name]
    raise UnknownMethod(f"unknown method '{name}': {did_you_mean(name, METHODS)}"
                      f"available: {', '.join(sorted(METHODS))}")
