"""Typed parameter blocks of the quantization methods: frozen pydantic models that forbid
unknown keys. The registry (``tasks.quantize.registry``) pairs each with its method; a spec's
method entry is validated against these fields. Torch-free.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class MethodConfig(BaseModel):
    """Base for method parameter blocks: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BaselineConfig(MethodConfig):
    """The unquantized model in its dtype. Takes no parameters."""


GroupFallback = Literal["ragged", "largest_divisor", "pad", "skip_layer", "error"]


class LayerOverride(BaseModel):
    """One per-layer override (``tasks.quantize.layers``): modules whose name matches
    ``pattern`` (fnmatch) get these bits / group size, or stay in dtype with ``keep: true``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = Field(min_length=1)
    bits: int | None = Field(None, ge=2, le=16)
    group_size: int | None = None
    keep: bool = False

    @model_validator(mode="after")
    def _something_to_do(self) -> LayerOverride:
        if not self.keep and self.bits is None and self.group_size is None:
            raise ValueError("an override sets bits, group_size or keep: true")
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ValueError("group_size is a positive integer or -1 (per output channel)")
        return self


PRUNE_METHODS = ("sparsegpt", "wanda", "magnitude")
NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
NM_GROUPS = (2, 4, 8, 16, 32, 64, 128)  # M must divide SparseGPT's 128-column blocks


def parse_sparsity(value: Any) -> float | str:
    """A sparsity as a spec writes it: a fraction of zero weights in (0, 1) (``0.5``), or an N:M
    pattern (``"2:4"``: at most N nonzero weights in every M consecutive input columns of a row,
    as sparse tensor cores read it); raises ValueError naming what is allowed."""
    if isinstance(value, bool):
        raise ValueError(f"sparsity {value!r}: a fraction in (0, 1) such as 0.5, or an N:M pattern such as '2:4'")
    if isinstance(value, (int, float)):
        if not 0 < value < 1:
            raise ValueError(f"sparsity {value!r}: a fraction of zero weights must lie strictly between 0 and 1, "
                             "e.g. 0.5; or give an N:M pattern such as '2:4'")
        return float(value)
    match = NM_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"sparsity {value!r}: a fraction in (0, 1) such as 0.5, or an N:M pattern such as '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if m not in NM_GROUPS or not 0 < n < m:
        raise ValueError(f"sparsity {value!r}: N:M needs 0 < N < M and M in {{{', '.join(map(str, NM_GROUPS))}}} "
                         "(N nonzero weights kept in every M input columns), e.g. '2:4', '4:8'")
    return f"{n}:{m}"


def nm_pattern(sparsity: float | str) -> tuple[int, int] | None:
    """(N, M) of an N:M sparsity, None for a fraction."""
    if isinstance(sparsity, str):
        n, m = sparsity.split(":")
        return int(n), int(m)
    return None


def zero_fraction(sparsity: float | str) -> float:
    """The fraction of weights a sparsity sets to zero (1 - N/M for N:M)."""
    pattern = nm_pattern(sparsity)
    return 1 - pattern[0] / pattern[1] if pattern else float(sparsity)


class PruneConfig(MethodConfig):
    """Parameters of the pruning methods (``sparsegpt``, ``wanda``, ``magnitude``).

    ```yaml
    methods:
      - {name: sparsegpt, sparsity: [0.5, "2:4"]}   # a list is an axis, like any parameter
    calibration: {dataset: pydoc-topics, samples: 64, seq_len: 512}   # sparsegpt and wanda
    ```

    - ``sparsity``: the fraction of each pruned layer's weights set to zero (``0.5``), or an
      N:M pattern (``"2:4"``, ``"4:8"``): at most N nonzero weights in every M consecutive input
      columns of each output row (the layout sparse tensor cores and compressed-tensors' 2:4
      format read). A layer whose input width M does not divide is left dense, and its record
      says why.
    """

    sparsity: float | str = 0.5

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity(cls, value: Any) -> float | str:
        return parse_sparsity(value)


class SparseGPTConfig(PruneConfig):
    """SparseGPT (llm-compressor's ``SparseGPTModifier``): per layer, the weights whose removal
    costs least under the calibration inputs' Hessian are zeroed, column block by column block,
    and the remaining weights of the row are updated to compensate (OBS).

    ```yaml
    - {name: sparsegpt, sparsity: ["2:4", 0.5], damping: 0.01}
    ```

    ``damping``: fraction of the Hessian's mean diagonal added to it (``dampening_frac``).
    """

    damping: float = Field(0.01, gt=0, lt=1)


class WandaConfig(PruneConfig):
    """Wanda (llm-compressor's ``WandaPruningModifier``): per output row, the weights with the
    smallest ``|w| * ||x||`` (input norm over the calibration tokens) are zeroed; no update of the
    remaining weights.

    ```yaml
    - {name: wanda, sparsity: [0.5, "2:4"]}
    ```
    """


class MagnitudeConfig(PruneConfig):
    """Magnitude pruning (data-free): per layer, the weights of smallest ``|w|`` are zeroed (a
    fraction over the whole layer, or the M - N smallest of every N:M group).

    ```yaml
    - {name: magnitude, sparsity: [0.5, "2:4"]}
    ```
    """


class PruneStage(BaseModel):
    """A pruning stage run before a quantization method (``prune:`` in a method entry): the
    pruning method's name and its parameters. Part of the cell's identity.

    ```yaml
    methods:
      - {name: rtn, sym: false, prune: [null, {method: sparsegpt, sparsity: ["2:4", 0.5]}]}
    ```
    (``null`` = not pruned; a list inside the stage is one more axis.)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["sparsegpt", "wanda", "magnitude"]
    sparsity: float | str = 0.5
    damping: float | None = None  # sparsegpt only (default 0.01)

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity(cls, value: Any) -> float | str:
        return parse_sparsity(value)

    @model_validator(mode="after")
    def _damping_for_sparsegpt(self) -> PruneStage:
        if self.method == "sparsegpt" and self.damping is None:
            object.__setattr__(self, "damping", 0.01)
        if self.method != "sparsegpt" and self.damping is not None:
            raise ValueError(f"damping is a sparsegpt parameter; '{self.method}' takes sparsity only")
        if self.damping is not None and not 0 < self.damping < 1:
            raise ValueError(f"damping {self.damping}: must lie strictly between 0 and 1")
        return self

    def config(self) -> PruneConfig:
        """The pruning method's own config."""
        params = {"sparsity": self.sparsity} | ({"damping": self.damping} if self.damping is not None else {})
        return {"sparsegpt": SparseGPTConfig, "wanda": WandaConfig, "magnitude": MagnitudeConfig}[self.method](**params)


class WeightQuantConfig(MethodConfig):
    """Parameters every weight-quantization method takes; the spec's top-level
    ``group_fallback`` and ``overrides`` fill them for methods that do not set their own.

    - ``group_fallback``: what a layer whose width the group size does not divide gets
      (``ragged`` | ``largest_divisor`` | ``pad`` | ``skip_layer`` | ``error``; see
      ``tasks.quantize.layers``). A method that cannot apply a policy is skipped for that cell.
    - ``overrides``: per-layer bits / group size / keep, by module-name pattern.
    - ``prune``: a pruning stage run first (``{method: sparsegpt | wanda | magnitude, sparsity:
      0.5 | "2:4", damping}``); the quantization then sees the pruned weights. Unset (null) =
      not pruned, and the cell keeps the identity it had before stages existed.
    """

    group_fallback: GroupFallback = "ragged"
    overrides: tuple[LayerOverride, ...] = ()
    prune: PruneStage | None = None


class RTNConfig(WeightQuantConfig):
    """Round-to-nearest group quantization.

    ```yaml
    - {name: rtn, sym: [true, false], zero_point: [int, float]}
    ```

    - ``sym``: symmetric (no zero point) or asymmetric.
    - ``zero_point``: for asymmetric only. ``int``: an integer zero point as GPTQ/AWQ formats
      store it (``w = scale * (q - z)``); ``float``: a float offset as llama.cpp's Q4_1 and HQQ
      store it (``w = min + scale * q``). Ignored (normalised to ``None``) when ``sym`` is true.
    """

    sym: bool = True
    zero_point: Literal["int", "float"] | None = "int"

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
      - {name: gsq, sym: false, zero_point: int, alpha_grid: 20}
    calibration: {dataset: pydoc-topics, samples: 32, seq_len: 256}
    ```

    ``sym`` and ``zero_point`` mean what they mean for ``rtn``; ``alpha_grid`` is the number of
    steps of the search over the scaling exponent in [0, 1] (``alpha_grid + 1`` candidates,
    0 = no scaling = rtn).
    """

    alpha_grid: int = Field(20, ge=1, le=1000)


class GPTQConfig(WeightQuantConfig):
    """GPTQ: column-by-column rounding with second-order error compensation on calibration data.

    ```yaml
    methods:
      - {name: gptq, engine: [gptqmodel, llmcompressor], sym: true, damping: 0.01,
         act_order: false, true_sequential: true}
    calibration: {dataset: pydoc-topics, samples: 32, seq_len: 256}
    ```

    - ``engine``: ``gptqmodel`` (GPTQModel; packed GPTQ checkpoint, reloaded with its torch
      kernel) or ``llmcompressor`` (vLLM's llm-compressor; compressed-tensors checkpoint).
      The same cell on both engines is a cross-library A/B.
    - ``damping``: fraction of the Hessian's mean diagonal added to it (GPTQModel
      ``damp_percent``, llm-compressor ``dampening_frac``).
    - ``act_order``: quantize columns in order of decreasing Hessian diagonal (``desc_act``).
    - ``true_sequential``: quantize the layers of a block one after another, each calibrated on
      the outputs of the already-quantized ones.
    - ``act_group_aware``: GPTQModel's group-aware reordering (GAR: columns quantized in
      Hessian-diagonal order within and across groups, groups kept contiguous, no ``g_idx``).
      Unset = the engine's own behaviour, spelled out in the cell: on for ``gptqmodel`` (its
      default unless ``act_order``), off for ``llmcompressor`` (which has none).
    - ``static_groups``: every group's scale and zero point fixed from the unquantized weights
      before GPTQ runs, instead of from the error-compensated weights when GPTQ reaches the
      group. Unset = the engine's behaviour: off for ``gptqmodel``, on for ``llmcompressor``
      (its only mode).

    The two engines' defaults are two different algorithms (SmolLM2 3-bit g64, token perplexity
    on sweeps/methods.yaml's held-out windows: GAR alone moves GPTQModel from 22.8 to 28.6); to
    compare the engines on equal
    terms set ``act_group_aware: false, static_groups: true`` on both.
    """

    engine: Literal["gptqmodel", "llmcompressor"] = "gptqmodel"
    sym: bool = True
    damping: float = Field(0.01, gt=0, lt=1)
    act_order: bool = False
    true_sequential: bool = True
    act_group_aware: bool | None = None
    static_groups: bool | None = None

    @model_validator(mode="after")
    def _engine_column_order(self) -> GPTQConfig:
        native_gar, native_static = (not self.act_order, False) if self.engine == "gptqmodel" else (False, True)
        if self.act_group_aware is None:
            object.__setattr__(self, "act_group_aware", native_gar)
        if self.static_groups is None:
            object.__setattr__(self, "static_groups", native_static)
        if self.act_group_aware and self.act_order:
            raise ValueError("act_group_aware and act_order are two column orders: set one of them false")
        if self.engine == "llmcompressor" and self.act_group_aware:
            raise ValueError("llm-compressor has no group-aware reordering: set act_group_aware: false "
                             "or use engine: gptqmodel")
        if self.engine == "llmcompressor" and not self.static_groups:
            raise ValueError("llm-compressor fixes every group's scale and zero point before GPTQ runs "
                             "(static groups only): set static_groups: true or use engine: gptqmodel")
        return self


class AWQConfig(WeightQuantConfig):
    """AWQ: activation-aware per-input-channel scales searched on calibration data, then group
    quantization.

    ```yaml
    methods:
      - {name: awq, engine: [gptqmodel, llmcompressor], sym: false}
    calibration: {dataset: pydoc-topics, samples: 32, seq_len: 256}
    ```
    """

    engine: Literal["gptqmodel", "llmcompressor"] = "gptqmodel"
    sym: bool = False


class HQQConfig(WeightQuantConfig):
    """Half-quadratic quantization (calibration-free): zero points and scales optimised per
    group to minimise an lp error of the weights, with HQQ's own API.

    ```yaml
    methods:
      - {name: hqq, optimize: true}
    ```
    """

    optimize: bool = True


class Int8Config(WeightQuantConfig):
    """8-bit integers: ``torchao`` = weight-only, one scale per output channel;
    ``llmcompressor`` = W8A8 (int8 weights and dynamic per-token int8 activations) after
    SmoothQuant moves activation outliers into the weights.

    ```yaml
    methods:
      - {name: int8, engine: [torchao, llmcompressor], smoothing_strength: 0.8}
    bits: [8]
    ```
    """

    engine: Literal["torchao", "llmcompressor"] = "torchao"
    smoothing_strength: float = Field(0.8, ge=0, le=1)  # llmcompressor's SmoothQuant only


class Int4Config(WeightQuantConfig):
    """4-bit integer weights, one scale and zero point per group, packed for a CUDA kernel:
    ``torchao`` = ``Int4WeightOnlyConfig`` in tinygemm's tile-packed layout
    (``torch.ops.aten._weight_int4pack_mm``, bfloat16 activations, compute capability >= 8.0).

    ```yaml
    methods:
      - {name: int4, engine: torchao}
    bits: [4]
    group_sizes: [64, 128]
    models:
      - {name: m, path: /models/m, dtype: bfloat16}
    ```

    The kernel exists on CUDA only: on a worker without a GPU the cell is skipped, with the
    reason (``Capabilities.requires_cuda``).
    """

    engine: Literal["torchao"] = "torchao"


class FP8Config(WeightQuantConfig):
    """FP8 (E4M3) weights with one scale per output channel.

    ```yaml
    methods:
      - {name: fp8, engine: llmcompressor}
    bits: [8]
    ```
    """

    engine: Literal["torchao", "llmcompressor"] = "llmcompressor"


class NF4Config(WeightQuantConfig):
    """4-bit NormalFloat (bitsandbytes): one absmax per block of ``group_size`` weights.
    A model is never saved after a forward pass (bitsandbytes 0.50.2 corrupts it).

    ```yaml
    methods:
      - {name: nf4, double_quant: false}
    bits: [4]
    group_sizes: [64]
    ```
    """

    double_quant: bool = False
