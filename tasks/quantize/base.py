"""The method Protocol and what a method reports. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    group_layout: str | None = None  # e.g. "4x128+64" (ragged), "6x96" (divisor), "1x576"
    fallback: str | None = None  # set when the width is not a multiple of the group size
    codes: int = 0  # quantized values stored
    scales: int = 0
    zeros: int = 0
    zero_bits: int = 0  # bits per stored zero point (bits for int, 16 for float)
    relative_error: float | None = None  # ||W - Q(W)||_F / ||W||_F
    reason: str | None = None  # why a layer stayed in high precision
    scale_alpha: float | None = None  # group scaling: exponent of the input-channel scales chosen

    def stored_bits(self, scale_bits: int = 16) -> int:
        return self.codes * (self.bits or 0) + self.scales * scale_bits + self.zeros * self.zero_bits


@dataclass
class QuantReport:
    """A quantized model's format and per-layer record."""

    weight_format: str  # "dense" | "fake-quant" | a packed format name
    kernel: str  # "dense" | "dequantized" | a packed kernel name
    layers: list[LayerReport] = field(default_factory=list)
    fallback: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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

    ``calib`` is the tokenized calibration set (None for calibration-free methods); ``cfg`` is
    the method's typed config from the registry; ``bits`` and ``group_size`` are None when the
    method does not take them.
    """

    def quantize(self, model: Any, calib: Any, cfg: Any, bits: int | None,
                 group_size: int | None) -> QuantReport: ...
