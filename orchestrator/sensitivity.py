"""Layer sensitivity as a study: cells that each quantize one unit of a model at one option and
leave every other layer in the model's dtype.

```yaml
sensitivity:
  unit: block            # block (a decoder block's linear layers) | layer (one linear layer)
                         # | type (one kind of layer in every block, e.g. mlp.down_proj)
  method: {name: rtn, sym: false}     # or a method name; a method that takes `overrides`
  options: [{bits: 2, group_size: 32}, {bits: 3, group_size: 32}, {bits: 4, group_size: 32}]
  models: [smollm2-135m]              # optional: the spec's models it studies (default: all)
  datasets: [select]                  # optional: the datasets unit cells are evaluated on (default: all)
```

A unit cell is an ordinary cell of its method: its ``overrides`` are the unit's pattern at the
option's bits and group size, then ``{pattern: "*", keep: true}`` (the first match wins,
``tasks.quantize.layers``), so it is content-hashed, scheduled, resumed and stored like any
other, and the same overrides written by hand are the same cell. Its ``bits`` and
``group_size`` are the option's. The units come from the names of the model's weights (the
safetensors headers of a local or hub model, the GGUF header of a catalogued one:
``orchestrator.preflight.ModelFacts.linear_names``): parsing the spec reads no weights, so they
are listed when the cells are expanded. The ``sensitivity`` view (analysis.derived) reads the
unit back from the pattern; ``qsweep allocate`` turns a finished study into a mixed-precision
spec (analysis.allocate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from orchestrator.spec import MethodVariant, ModelEntry, Spec, SpecError, identity_params
from tasks.quantize.registry import get_method

UNITS = ("block", "layer", "type")
STUDY_KEYS = ("unit", "method", "options", "models", "datasets")
KEEP_REST = {"pattern": "*", "keep": True}


@dataclass(frozen=True)
class Study:
    unit: str
    method: MethodVariant  # its params without overrides
    options: tuple[tuple[int | None, int | None], ...]  # (bits, group_size)
    models: tuple[str, ...]  # model names the study covers
    datasets: tuple[str, ...] = ()  # dataset names its cells are evaluated on (empty: all)


@dataclass(frozen=True)
class Unit:
    kind: str  # block | layer | type
    label: str  # '3' (block 3), 'mlp.down_proj' (type), 'model.layers.3.mlp.down_proj' (layer)
    pattern: str  # the override pattern selecting its layers


def parse_study(value: Any, model_names: list[str], dataset_names: list[str], problems: Any,
                defaults: dict[str, Any]) -> Study | None:
    """The ``sensitivity:`` block, validated; problems go to ``problems`` (spec._Problems)."""
    from orchestrator.spec import _MISSING, _keys, _parse_methods, _unknown

    if value is None:
        return None
    if not isinstance(value, dict):
        problems.add("sensitivity", value, "must be a mapping {unit, method, options, models}, e.g. "
                     "{unit: block, method: rtn, options: [{bits: 3, group_size: 32}]}")
        return None
    for key in value:
        if key not in STUDY_KEYS:
            problems.add(f"sensitivity.{key}", _MISSING, _unknown(key, STUDY_KEYS))
    unit = value.get("unit", _MISSING)
    if unit not in UNITS:
        problems.add("sensitivity.unit", unit, f"allowed: {_keys(UNITS)} (block: a decoder block's linear "
                     "layers; layer: one linear layer; type: one kind of layer, e.g. mlp.down_proj, in every block)")
    entry = value.get("method", _MISSING)
    if entry is _MISSING:
        problems.add("sensitivity.method", _MISSING, "missing; name the method, e.g. `method: rtn`")
        return None
    entry = {"name": entry} if isinstance(entry, str) else entry
    before = len(problems.items)
    study_defaults = {k: v for k, v in defaults.items() if k != "overrides"}  # the study sets its own
    variants = _parse_methods([entry], problems, study_defaults)
    for i in range(before, len(problems.items)):
        problems.items[i] = problems.items[i].replace(": methods[0]", ": sensitivity.method", 1)
    if len(problems.items) > before or not variants:
        return None
    if len(variants) > 1:
        problems.add("sensitivity.method", entry, "one method with one value per parameter (the options are the axis)")
        return None
    (variant,) = variants
    info = get_method(variant.name)
    if "overrides" not in info.config.model_fields:
        problems.add("sensitivity.method", variant.name, "takes no per-layer overrides, so it cannot quantize one "
                     "unit alone; use a weight-quantization method such as rtn, gptq or gsq")
        return None
    params = {k: v for k, v in variant.params.items() if k != "overrides"}
    options = _parse_options(value.get("options", _MISSING), info, variant.params, problems)
    models = value.get("models", model_names)
    if not isinstance(models, list) or not models:
        problems.add("sensitivity.models", models, "a non-empty list of the spec's model names")
        models = []
    for i, name in enumerate(models):
        if name not in model_names:
            problems.add(f"sensitivity.models[{i}]", name, f"not a model of this spec ({_keys(model_names)})")
    datasets = value.get("datasets", [])
    if not isinstance(datasets, list):
        problems.add("sensitivity.datasets", datasets, "a list of the spec's dataset names")
        datasets = []
    for i, name in enumerate(datasets):
        if name not in dataset_names:
            problems.add(f"sensitivity.datasets[{i}]", name, f"not a dataset of this spec ({_keys(dataset_names)})")
    if unit not in UNITS or not options:
        return None
    return Study(unit=unit, method=MethodVariant(name=variant.name, params=params), options=tuple(options),
                 models=tuple(m for m in models if m in model_names),
                 datasets=tuple(d for d in datasets if d in dataset_names))


def _parse_options(value: Any, info: Any, params: dict[str, Any], problems: Any) -> list[tuple]:
    from orchestrator.spec import _MISSING

    example = "[{bits: 3, group_size: 32}, {bits: 4, group_size: 32}]"
    if not isinstance(value, list) or not value:
        problems.add("sensitivity.options", value, f"a non-empty list of {{bits, group_size}}, e.g. {example}")
        return []
    caps = info.caps(params)
    options = []
    for i, option in enumerate(value):
        where = f"sensitivity.options[{i}]"
        if not isinstance(option, dict) or set(option) - {"bits", "group_size"}:
            problems.add(where, option, f"a mapping {{bits, group_size}}, e.g. {example}")
            continue
        bits, group = option.get("bits", _MISSING), option.get("group_size", _MISSING)
        if info.uses_bits and (not isinstance(bits, int) or isinstance(bits, bool) or bits not in caps.bits):
            problems.add(f"{where}.bits", bits, f"'{info.name}' supports bits {sorted(caps.bits)}")
            continue
        if info.uses_group_size and (not isinstance(group, int) or isinstance(group, bool)
                                     or not (group > 0 or group == -1)):
            problems.add(f"{where}.group_size", group, "a positive integer or -1 (per output channel)")
            continue
        chosen = (bits if info.uses_bits else None, group if info.uses_group_size else None)
        if chosen in options:
            problems.add(where, option, "the same option twice; remove one")
            continue
        options.append(chosen)
    return options


def units(names: tuple[str, ...], kind: str) -> list[Unit]:
    """The units of a model whose decoder-block linear layers are ``names``
    (``<container>.<block>.<path>``), in block order."""
    parsed = []
    for name in names:
        match = re.match(r"^(.+?)\.(\d+)\.(.+)$", name)
        if match:
            parsed.append((match[1], int(match[2]), match[3], name))
    if kind == "layer":
        return [Unit("layer", name, name) for *_, name in parsed]
    if kind == "block":
        blocks = sorted({(container, block) for container, block, _, _ in parsed})
        return [Unit("block", str(block), f"{container}.{block}.*") for container, block in blocks]
    paths = sorted({(container, path) for container, _, path, _ in parsed}, key=lambda cp: cp[1])
    return [Unit("type", path, f"{container}.*.{path}") for container, path in paths]


def unit_params(study: Study, unit: Unit, bits: int | None, group_size: int | None) -> dict[str, Any]:
    """The method parameters of one unit cell, normalised as the spec's own variants are."""
    info = get_method(study.method.name)
    override = {"pattern": unit.pattern, "bits": bits, "group_size": group_size}
    return identity_params(info.config(**study.method.params, overrides=[override, KEEP_REST]))


def study_variants(spec: Spec, model: ModelEntry) -> list[MethodVariant]:
    """The unit cells' method variants for one model of the spec (none if the study leaves it out)."""
    study = spec.sensitivity
    if study is None or model.name not in study.models:
        return []
    names = _linear_names(model.path, model.revision)
    if not names:
        raise SpecError([f"{spec.source}: sensitivity: cannot list the linear layers of model '{model.name}' "
                         f"({model.path}): its weights' headers are not at hand (a local directory with "
                         "*.safetensors, a hub id the hub or its cache can answer for, or a catalogued "
                         "model whose package is installed); `qsweep fetch SPEC` downloads a hub model"])
    variants = []
    for unit in units(names, study.unit):
        for bits, group_size in study.options:
            params = unit_params(study, unit, bits, group_size)
            variants.append(MethodVariant(name=study.method.name, params=params,
                                          bits=(bits,) if bits is not None else None,
                                          group_sizes=(group_size,) if group_size is not None else None))
    return variants


@lru_cache(maxsize=64)
def _linear_names(path: str, revision: str | None) -> tuple[str, ...]:
    from orchestrator.preflight import model_facts

    facts = model_facts(path, revision)
    return facts.linear_names if facts is not None else ()


def describe(params: dict[str, Any]) -> Unit | None:
    """The unit a cell's method parameters quantize alone (its overrides: one pattern with bits
    or a group size, then everything kept), or None for any other cell."""
    overrides = params.get("overrides") or ()
    if len(overrides) != 2 or overrides[1].get("pattern") != "*" or not overrides[1].get("keep"):
        return None
    pattern = overrides[0]["pattern"]
    if match := re.match(r"^(.+)\.(\d+)\.\*$", pattern):
        return Unit("block", match[2], pattern)
    if match := re.match(r"^(.+?)\.\*\.(.+)$", pattern):
        return Unit("type", match[2], pattern)
    return Unit("layer", pattern, pattern)
