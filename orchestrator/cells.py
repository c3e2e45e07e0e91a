"""Expand a spec into cells and groups; the one definition of the cell hash."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from orchestrator.schema import SCHEMA_VERSION
from orchestrator.spec import DatasetEntry, ModelEntry, Spec, canonical_json
from tasks.naming import did_you_mean
from tasks.profile.config import ProfileConfig
from tasks.quantize.registry import get_method

# The identity format's version, hashed under its historical key "schema_version": the row
# schema's version was hashed there until schema 2, so freezing it at 1 keeps every stored
# cell_id. Change it only when what a cell *is* changes, never for a new row column.
IDENTITY_VERSION = 1


def canonical_hash(payload: Any) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@dataclass(frozen=True)
class Cell:
    """One (model, method + params, bits, group size, calibration, dataset + settings, seed)."""

    sweep: str
    model: ModelEntry
    method: str
    params: dict[str, Any]
    bits: int | None
    group_size: int | None
    calibration: dict[str, Any] | None
    dataset: DatasetEntry
    seed: int
    # How the cell is profiled: a measurement setting, recorded in the row, never in identity().
    profile: ProfileConfig = field(default_factory=ProfileConfig, compare=False, repr=False)
    # canonical_json(params) when the caller has it already (expansion: once per variant)
    params_canonical: str | None = field(default=None, compare=False, repr=False)

    def quant_identity(self) -> dict[str, Any]:
        return {
            "model": json.loads(self.model.canonical),
            "method": self.method,
            "params": self.params,
            "bits": self.bits,
            "group_size": self.group_size,
            "calibration": self.calibration,
            "seed": self.seed,
        }

    def identity(self) -> dict[str, Any]:
        d = self.dataset
        return {
            **self.quant_identity(),
            "dataset": {"name": d.name, "task": d.task, "path": d.path, "limit": d.limit,
                        "settings": d.settings},
            "schema_version": IDENTITY_VERSION,
        }

    @cached_property
    def _quant_parts(self) -> dict[str, str]:
        """Canonical JSON of each identity field; the entries' parts are computed once each."""
        return {"bits": _scalar(self.bits),
                "calibration": "null" if self.calibration is None else canonical_json(self.calibration),
                "group_size": _scalar(self.group_size), "method": canonical_json(self.method),
                "model": self.model.canonical,
                "params": self.params_canonical or canonical_json(self.params),
                "schema_version": _scalar(IDENTITY_VERSION), "seed": _scalar(self.seed)}

    @cached_property
    def cell_id(self) -> str:
        """sha256 of ``canonical_json(self.identity())``, assembled from cached parts (100,000
        cells hash in about a second; tests check it equals the plain encoding)."""
        parts = self._quant_parts | {"dataset": self.dataset.canonical}
        return hashlib.sha256(_join(parts).encode()).hexdigest()[:24]

    @cached_property
    def group_id(self) -> str:
        return hashlib.sha256(_join(self._quant_parts).encode()).hexdigest()[:24]

    def axis_values(self) -> dict[str, Any]:
        return {"model": self.model.name, "method": self.method, "bits": self.bits,
                "group_size": self.group_size, "dataset": self.dataset.name, **self.params}


def _scalar(value: int | None) -> str:
    """canonical_json of an int or None, without the encoder's overhead."""
    return "null" if value is None else str(int(value)) if not isinstance(value, bool) else canonical_json(value)


def _join(parts: dict[str, str]) -> str:
    return "{" + ",".join(f'"{key}":{parts[key]}' for key in sorted(parts)) + "}"


@dataclass(frozen=True)
class Group:
    """Cells sharing one quantization config: quantized once, evaluated per dataset."""

    group_id: str
    cells: tuple[Cell, ...]

    @property
    def head(self) -> Cell:
        return self.cells[0]

    @property
    def profile(self) -> ProfileConfig:
        """Profile settings of the sweep the group came from."""
        return self.head.profile


def expand(spec: Spec, sensitivity: bool = True) -> list[Cell]:
    """The grid, honouring each method's axes and the exclude rules; no duplicates. With
    ``sensitivity`` (and a ``sensitivity:`` block), each model's unit cells follow its grid: their
    units come from the model's weights (``orchestrator.sensitivity``), which parsing never reads."""
    cells: list[Cell] = []
    pairs = list(itertools.product(spec.models, spec.methods))
    if sensitivity and spec.sensitivity is not None:
        from orchestrator.sensitivity import study_variants

        pairs += [(model, variant) for model in spec.models for variant in study_variants(spec, model)]
    study = len(spec.models) * len(spec.methods)  # the pairs from here on are the study's
    seen: set[str] = set()
    for index, (model, variant) in enumerate(pairs):
        info = get_method(variant.name)
        datasets = spec.datasets
        if index >= study and spec.sensitivity.datasets:
            datasets = tuple(d for d in spec.datasets if d.name in spec.sensitivity.datasets)
        bits_axis = (variant.bits or spec.bits) if info.uses_bits else (None,)
        groups_axis = (variant.group_sizes or spec.group_sizes) if info.uses_group_size else (None,)
        calibrations = (spec.calibrations or (None,)) if info.calibrated(variant.params) else (None,)
        for bits, group_size, calibration, dataset in itertools.product(bits_axis, groups_axis, calibrations,
                                                                        datasets):
            cell = Cell(sweep=spec.name, model=model, method=variant.name, params=variant.params,
                        bits=bits, group_size=group_size, calibration=calibration,
                        dataset=dataset, seed=spec.seed, profile=spec.profile,
                        params_canonical=variant.canonical)
            if any(_matches(rule, cell) for rule in spec.exclude) or cell.cell_id in seen:
                continue  # excluded, or a unit cell the grid has already (its overrides written by hand)
            seen.add(cell.cell_id)
            cells.append(cell)
    return cells


def count_cells(spec: Spec) -> int:
    """Cells of the grid before excludes, without building them (and without the sensitivity
    study's, which need the models' weights to list)."""
    total = 0
    for variant in spec.methods:
        info = get_method(variant.name)
        total += ((len(variant.bits or spec.bits) if info.uses_bits else 1)
                  * (len(variant.group_sizes or spec.group_sizes) if info.uses_group_size else 1)
                  * (len(spec.calibrations) or 1 if info.calibrated(variant.params) else 1))
    return total * len(spec.models) * len(spec.datasets)


def _matches(rule: dict[str, list], cell: Cell) -> bool:
    values = cell.axis_values()
    return all(key in values and values[key] in allowed for key, allowed in rule.items())


def parse_rerun(texts: list[str], cells: list[Cell]) -> list[dict[str, list]]:
    """``--rerun`` rules, ``key=value[,key=value...]`` (keys: model, method, bits, group_size,
    dataset or a method parameter; values read as YAML scalars), each matching some cell of the
    spec; a problem raises ValueError saying what is allowed."""
    import yaml

    keys = sorted({key for cell in cells for key in cell.axis_values()})
    rules = []
    for text in texts:
        rule: dict[str, list] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--rerun {text!r}: {part!r} is not key=value (e.g. method=hqq,bits=3)")
            if key.strip() not in keys:
                raise ValueError(f"--rerun {text!r}: unknown key {key.strip()!r}; "
                                 f"{did_you_mean(key.strip(), keys)}allowed: {', '.join(keys)}")
            rule[key.strip()] = [yaml.safe_load(value)]
        if not rule:
            raise ValueError(f"--rerun {text!r}: empty rule (e.g. method=hqq,bits=3)")
        if not any(_matches(rule, cell) for cell in cells):
            raise ValueError(f"--rerun {text!r} matches no cell of the spec (`qsweep plan SPEC --cells` lists them)")
        rules.append(rule)
    return rules


def rerun_ids(rules: list[dict[str, list]], cells: list[Cell]) -> set[str]:
    """Cells the rules ask to run again, whatever their rows say."""
    return {cell.cell_id for cell in cells if any(_matches(rule, cell) for rule in rules)} if rules else set()


def group_cells(cells: list[Cell]) -> list[Group]:
    """Groups in first-seen order, cells of one model kept together."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group_id, []).append(cell)
    ordered = sorted(groups.items(), key=lambda kv: kv[1][0].model.name)
    return [Group(group_id=gid, cells=tuple(members)) for gid, members in ordered]


def identity_columns(cell: Cell) -> dict[str, Any]:
    """The identity group of a result row, derived from the cell alone."""
    from tasks.evaluate.registry import get_task

    d = cell.dataset
    return {
        "schema_version": SCHEMA_VERSION,
        "sweep": cell.sweep,
        "cell_id": cell.cell_id,
        "group_id": cell.group_id,
        "model": cell.model.name,
        "model_path": cell.model.path,
        "model_revision": cell.model.revision,
        "dtype": cell.model.dtype,
        "method": cell.method,
        "method_params": json.dumps(cell.params, sort_keys=True),
        "method_version": get_method(cell.method).version,
        "bits": cell.bits,
        "group_size": cell.group_size,
        "calibration": json.dumps(cell.calibration, sort_keys=True) if cell.calibration else None,
        "dataset": d.name,
        "task": d.task,
        "task_version": get_task(d.task).version,
        "dataset_path": d.path,
        "limit": d.limit,
        "eval_settings": json.dumps(d.settings, sort_keys=True),
        "seed": cell.seed,
    }
