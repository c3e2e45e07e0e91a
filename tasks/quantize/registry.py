"""The one method registry: names, capabilities and typed configs, imported lazily.

Adding a method = one module in this package + one entry in ``METHODS``. The registry stores
``"module:attr"`` strings and imports the implementation on first use, so listing and
validating methods never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from tasks.naming import did_you_mean
from pydantic import BaseModel, ConfigDict, Field, model_validator


class MethodConfig(BaseModel):
    """Base for method parameter blocks: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BaselineConfig(MethodConfig):
    """The unquantized model in its dtype. Takes no parameters."""


class RTNConfig(MethodConfig):
    """Round-to-nearest group quantization.

    ```yaml
    - {name: rtn, sym: [true, false], zero_point: [int, float], fallback: ragged}
    ```

    - ``sym``: symmetric (no zero point) or asymmetric.
    - ``zero_point``: for asymmetric only. ``int``: an integer zero point as GPTQ/AWQ formats
      store it (``w = scale * (q - z)``); ``float``: a float offset as llama.cpp's Q4_1 and HQQ
      store it (``w = min + scale * q``). Ignored (normalised to ``None``) when ``sym`` is true.
    - ``fallback``: what a layer whose input width is not a multiple of the group size gets.
      ``ragged``: full groups plus one shorter last group; ``divisor``: the largest group size
      below the requested one that divides the width; ``skip``: the layer stays unquantized.
    """

    sym: bool = True
    zero_point: Literal["int", "float"] | None = "int"
    fallback: Literal["ragged", "divisor", "skip"] = "ragged"

    @model_validator(mode="after")
    def _zero_point_only_when_asymmetric(self) -> RTNConfig:
        if self.sym and self.zero_point is not None:
            object.__setattr__(self, "zero_point", None)
        if not self.sym and self.zero_point is None:
            object.__setattr__(self, "zero_point", "int")
        return self


class GSQConfig(RTNConfig):
    """Group scaling quantization: activation-aware per-input-channel scales, then RTN's groups.

    ```yaml
    methods:
      - {name: gsq, sym: false, zero_point: int, fallback: ragged, alpha_grid: 20}
    calibration: {dataset: pydoc-topics, samples: 32, seq_len: 256}
    ```

    ``sym``, ``zero_point`` and ``fallback`` mean what they mean for ``rtn``; ``alpha_grid`` is
    the number of steps of the search over the scaling exponent in [0, 1] (``alpha_grid + 1``
    candidates, 0 = no scaling = rtn).
    """

    alpha_grid: int = Field(20, ge=1, le=1000)


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
    supported_bits: frozenset[int] = frozenset()
    per_channel: bool = True  # group_size -1 = one scale per output channel
    non_divisible_groups: bool = False  # handles widths that the group size does not divide
    packed_format: str | None = None  # None: the quantized model is held dequantized
    in_place: bool = True  # changes the model's weights, so it gets a copy of the base model

    def supports_group_size(self, group_size: int) -> bool:
        if group_size == -1:
            return self.per_channel
        return group_size > 0

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
        packed_format="dense",
        in_place=False,
    ),
    "rtn": MethodInfo(
        name="rtn",
        target="tasks.quantize.rtn:RTN",
        config=RTNConfig,
        version="1",
        description="round-to-nearest group quantization (torch, fake-quant)",
        supported_bits=frozenset(range(2, 9)),
        non_divisible_groups=True,
    ),
    "gsq": MethodInfo(
        name="gsq",
        target="tasks.quantize.gsq:GSQ",
        config=GSQConfig,
        version="1",
        description="group scaling quantization: activation-aware input-channel scales searched "
                    "on calibration data, then rtn's group quantizer (torch, fake-quant)",
        needs_calibration=True,
        supported_bits=frozenset(range(2, 9)),
        non_divisible_groups=True,
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
