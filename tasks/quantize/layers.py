"""Which linear layers a weight-quantization method touches, at what bits and group size, and
what each layer gets when the group size does not divide its width. Every method (torch or an
engine) starts from this plan, so the per-layer record means the same thing for all of them.

```yaml
group_fallback: largest_divisor        # ragged | largest_divisor | pad | skip_layer | error
overrides:
  - {pattern: lm_head, bits: 8}                  # quantize the head too, at 8 bits
  - {pattern: "model.layers.0.*", bits: 8, group_size: 32}
  - {pattern: "*.down_proj", keep: true}         # leave in the model's dtype
```

Policies for a layer of input width ``w`` not a multiple of the group size ``g``:

- ``ragged``: ``w // g`` full groups and one shorter last group (``4x128+64`` for 576 at 128);
- ``largest_divisor``: every group of the largest size ``<= g`` that divides ``w`` (``6x96``);
- ``pad``: the width is padded with zero columns to a multiple of ``g``; the padded codes are
  stored (and counted) as packed formats that pad store them (``5x128`` with 64 padded);
- ``skip_layer``: the layer stays in the model's dtype (counted as high precision);
- ``error``: such a group size is refused for the model before any cell runs.

Overrides match module names with shell-style patterns (``fnmatch``); the first match wins.
The output head (``lm_head``) stays in dtype unless an override gives it bits.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from tasks.quantize.configs import GroupFallback

if TYPE_CHECKING:  # torch-free at import: preflight uses ``non_divisible``
    import torch

HEAD_NAMES = ("lm_head",)
POLICIES = get_args(GroupFallback)


def linear_layers(model: torch.nn.Module, include_head: bool = False) -> list[tuple[str, torch.nn.Linear]]:
    """The model's linear layers in order; the output head is left out unless asked for."""
    import torch

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and (include_head or name.split(".")[-1] not in HEAD_NAMES)]


def is_head(name: str) -> bool:
    return name.split(".")[-1] in HEAD_NAMES


def largest_divisor(width: int, group_size: int) -> int:
    return max(d for d in range(1, min(group_size, width) + 1) if width % d == 0)


def group_layout(width: int, group_size: int, policy: str) -> tuple[list[int], str | None]:
    """Group widths covering ``width`` input channels and the policy applied (None if the group
    size divides the width). ``pad`` returns full groups whose sum exceeds ``width``; an empty
    list means the layer is kept in dtype (``skip_layer``)."""
    if group_size == -1 or group_size >= width:
        return [width], None
    if width % group_size == 0:
        return [group_size] * (width // group_size), None
    if policy == "ragged":
        return [group_size] * (width // group_size) + [width % group_size], "ragged"
    if policy == "largest_divisor":
        size = largest_divisor(width, group_size)
        return [size] * (width // size), "largest_divisor"
    if policy == "pad":
        return [group_size] * -(-width // group_size), "pad"
    if policy == "skip_layer":
        return [], "skip_layer"
    raise ValueError(f"group size {group_size} does not divide width {width} and group_fallback is "
                     f"'{policy}'; pick a divisor or another group_fallback ({', '.join(POLICIES)})")


def describe_layout(groups: list[int], width: int | None = None) -> str:
    """``6x96``, ``4x128+64``; ``5x128 (pad 64)`` when the groups cover more than ``width``."""
    if not groups:
        return "none"
    head, count = groups[0], sum(1 for g in groups if g == groups[0])
    text = f"{count}x{head}" + "".join(f"+{g}" for g in groups[count:])
    if width is not None and sum(groups) > width:
        text += f" (pad {sum(groups) - width})"
    return text


@dataclass(frozen=True)
class LayerPlan:
    """One linear layer: what to do with it. ``bits is None`` means kept in dtype (``reason``)."""

    name: str
    module: torch.nn.Linear
    bits: int | None
    group_size: int | None  # as requested for this layer (after overrides); -1 = per channel
    groups: tuple[int, ...]  # group widths along the input axis (padded under ``pad``)
    fallback: str | None  # policy applied when group_size does not divide the width
    reason: str | None = None  # why kept in dtype
    override: str | None = None  # the pattern that set this layer's bits / group size

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def effective_group_size(self) -> int | None:
        """The one group size an engine that takes a single size per layer should use."""
        if not self.groups:
            return None
        if self.group_size == -1:
            return -1
        return self.groups[0]


def _override_for(name: str, overrides: Any) -> Any:
    for override in overrides or ():
        if fnmatch.fnmatchcase(name, override.pattern):
            return override
    return None


def plan_layers(model: torch.nn.Module, bits: int, group_size: int, cfg: Any) -> list[LayerPlan]:
    """The plan for every linear layer (head included), from ``cfg.group_fallback`` and
    ``cfg.overrides`` (configs without them get ``ragged`` and none)."""
    policy = getattr(cfg, "group_fallback", "ragged")
    overrides = getattr(cfg, "overrides", ())
    plans = []
    for name, module in linear_layers(model, include_head=True):
        width = module.weight.shape[1]
        override = _override_for(name, overrides)
        layer_bits, layer_group = bits, group_size
        if override is not None:
            if override.keep:
                plans.append(LayerPlan(name, module, None, None, (), None,
                                       reason=f"kept in dtype by override '{override.pattern}'",
                                       override=override.pattern))
                continue
            layer_bits = override.bits if override.bits is not None else bits
            layer_group = override.group_size if override.group_size is not None else group_size
        elif is_head(name):
            plans.append(LayerPlan(name, module, None, None, (), None, reason="output head kept in dtype"))
            continue
        groups, fallback = group_layout(width, layer_group, policy)
        if not groups:
            plans.append(LayerPlan(name, module, None, layer_group, (), fallback,
                                   reason=f"width {width} not a multiple of group size {layer_group} "
                                          "(group_fallback: skip_layer)",
                                   override=override.pattern if override else None))
            continue
        plans.append(LayerPlan(name, module, layer_bits, layer_group, tuple(groups), fallback,
                               override=override.pattern if override else None))
    return plans


def non_divisible(widths: dict[str, int], group_size: int | None) -> dict[str, int]:
    """The widths (by config key) a group size does not divide."""
    if group_size in (None, -1):
        return {}
    return {key: width for key, width in widths.items() if width % group_size and width > group_size}
