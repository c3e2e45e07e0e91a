"""The method Protocol and what a method reports. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class LayerReport:
    """What a method did to one linear layer."""

    name: str
    in_features: int
    out_features: int
    quantized: bool
    bits: int | None = None
    group_size: int | None = None  # as requested; -1 = per output channel
    group_layout: str | None = None  # e.g. "4x128+64" (ragged), "6x96" (largest_divisor), "1x576"
    fallback: str | None = None  # group_fallback policy applied (the group size does not divide the width)
    codes: int = 0  # quantized values stored
    scales: int = 0
    zeros: int = 0
    zero_bits: int = 0  # bits per stored zero point (bits for int, 16 for float)
    relative_error: float | None = None  # ||W - Q(W)||_F / ||W||_F
    reason: str | None = None  # why a layer stayed in high precision
    scale_alpha: float | None = None  # group scaling: exponent of the input-channel scales chosen
    override: str | None = None  # the override pattern that set this layer's bits / group size
    scale_bits: int = 16  # bits per stored scale (32 for bitsandbytes' fp32 absmax, torchao's fp32 scales)
    # bits one code occupies as stored where the packing wastes some (hqq's 3 bits: 10 codes per
    # int32 plus padding rows, about 3.2); None = bits
    code_bits: float | None = None
    sparsity: float | None = None  # fraction of the weight's entries that are zero, as evaluated
    sparsity_pattern: str | None = None  # what a prune stage asked of it: "2:4", "unstructured 0.5"
    # bytes the weight occupies in a sparse storage format (values, bitmask, offsets), counted
    # from the file written; None = stored as codes (quantized) or dense
    stored_bytes: int | None = None

    def stored_bits(self, scale_bits: int | None = None) -> int:
        scale_bits = self.scale_bits if scale_bits is None else scale_bits
        per_code = self.code_bits if self.code_bits is not None else (self.bits or 0)
        return round(self.codes * per_code) + self.scales * scale_bits + self.zeros * self.zero_bits


@dataclass(frozen=True)
class QuantContext:
    """What a method may need beyond the model: where the base model lives on disk (engines that
    load from a folder), a scratch folder for this quantization, the device and thread count."""

    model_path: str  # local HF folder of the base model
    workdir: Path  # empty folder owned by this quantization; a saved checkpoint goes here
    device: str = "cpu"
    threads: int = 1
    seed: int = 0


@dataclass
class QuantReport:
    """A quantized model's format and per-layer record.

    ``model`` is set by methods that build a new model (an engine's packed reload) instead of
    changing the given one in place; ``checkpoint_dir`` by methods that saved a checkpoint
    transformers loads (``qsweep export`` copies it; ``checkpoint_bytes`` is its weight files'
    size on disk).
    """

    weight_format: str  # "dense" | "fake-quant" | a packed format name
    kernel: str  # "dense" | "dequantized" | a packed kernel name
    layers: list[LayerReport] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    checkpoint_dir: str | None = None
    checkpoint_format: str | None = None  # "gptq", "awq", "compressed-tensors", ...
    checkpoint_bytes: int | None = None
    engine: str | None = None  # library and version that quantized, e.g. "gptqmodel 7.6.0"
    activations: str | None = None  # activation quantization, e.g. "int8 dynamic per token"; None = weight-only

    @property
    def fallback(self) -> str | None:
        """The group_fallback policy applied to some layer (one policy per cell), or None."""
        return next((layer.fallback for layer in self.layers if layer.fallback), None)

    @property
    def quantized_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.quantized]

    def bits_per_weight(self) -> float | None:
        quantized = self.quantized_layers
        weights = sum(layer.codes for layer in quantized)
        if not weights:
            return None
        return sum(layer.stored_bits() for layer in quantized) / weights


class QuantMethod(Protocol):
    """A quantization method: quantize ``model`` in place and say what was done.

    ``calib`` is the calibration (``tasks.calibration.Calibration``; None for calibration-free
    methods); ``cfg`` is the method's typed config from the registry; ``bits`` and
    ``group_size`` are None when the method does not take them; ``ctx`` says where the base
    model is on disk and gives a scratch folder.
    """

    def quantize(self, model: Any, calib: Any, cfg: Any, bits: int | None,
                 group_size: int | None, ctx: QuantContext) -> QuantReport: ...
