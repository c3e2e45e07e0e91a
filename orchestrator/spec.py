"""Parse and validate a sweep spec: every problem at once, before any GPU time.

A spec is pure data. Parsing touches no GPU, no network and no environment variable; it reads
the YAML file and the torch-free method and task registries.
"""

from __future__ import annotations

import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tasks.catalog import KNOWN_MODELS
from tasks.evaluate.registry import KNOWN_DATASETS, TASKS, UnknownTask, get_task, settings_dump
from tasks.locations import is_local, kind
from tasks.naming import did_you_mean
from tasks.profile.config import ProfileConfig
from tasks.quantize.registry import ALL_FALLBACKS, METHODS, UnknownMethod, get_method

TOP_LEVEL_KEYS = {
    "name": "sweep name (letters, digits, '-', '_', '.')",
    "models": "list of {name, path, dtype}",
    "methods": "list of {name, <param>: value | [values]}",
    "bits": "list of bit widths, for methods that take bits",
    "group_sizes": "list of group sizes (-1 = one scale per output channel)",
    "datasets": "list of {name, task, path, limit, <task setting>: value}",
    "calibration": "{dataset, samples, seq_len}, for methods that need calibration; a list of such "
                   "mappings (or list values inside one) crosses calibrated methods with each",
    "sensitivity": "{unit: block | layer | type, method: <name or {name, <param>: value}>, options: "
                   "[{bits, group_size}], models: [names]}: cells that each quantize one unit at one "
                   "option and keep the rest in dtype (orchestrator.sensitivity)",
    "exclude": "list of {axis: value | [values]} rules; a cell matching every key is dropped",
    "seed": "integer seed recorded in every cell (default 0)",
    "cpu_actors": "number of CPU actors when the cluster has no GPU (default 1)",
    "reuse": "true (default): a cell finished ok in another sweep of the same store is reused, not "
             "run again; false: this sweep runs its own (isolation)",
    "retries": "{crash: 2, oom: 2, timeout: 0}: retries per failure class",
    "timeout_s": "hard limit in seconds for loading + quantizing a group, and for each cell's evaluation + profiling",
    "profile": "{prompt_len, gen_len, batch_sizes, repeats, warmup}: how latency, throughput and "
               "memory are measured (recorded in rows, not part of a cell's identity)",
    "group_fallback": "ragged | largest_divisor | pad | skip_layer | error (or a list to sweep): what layers "
                      "a group size does not divide get, for every method that does not set its own",
    "overrides": "list of {pattern, bits, group_size, keep}: per-layer settings by module-name pattern, "
                 "for every method that does not set its own",
}
METHOD_DEFAULT_KEYS = ("group_fallback", "overrides")  # top-level keys that are method parameters
RETRYABLE = {"crash": 2, "oom": 2, "timeout": 0}
DETERMINISTIC = ("shape", "unsupported", "data", "auth", "nan", "error")
DEFAULT_MAX_CELLS = 1_000_000
DTYPES = ("float32", "float16", "bfloat16")
MODEL_KEYS = ("name", "path", "dtype", "trust_remote_code", "revision", "gpus_per_actor")
DATASET_KEYS = ("name", "task", "path", "limit")
CALIBRATION_KEYS = ("dataset", "samples", "seq_len")
AXES = ("model", "method", "bits", "group_size", "dataset")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class SpecError(Exception):
    """All problems found in a spec; ``str()`` lists one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str
    dtype: str
    trust_remote_code: bool = False
    revision: str | None = None  # a hub id's branch, tag or commit; None: the default branch
    # GPUs one actor holds for this model (its layers spread over them); where a cell runs, not
    # what it computes: not part of the identity
    gpus_per_actor: int = 1

    @cached_property
    def canonical(self) -> str:
        """Canonical JSON of the fields that identify the model in a cell (``revision`` only
        when pinned, so that cells of unpinned models keep the identity they always had)."""
        fields = {"name": self.name, "path": self.path, "dtype": self.dtype}
        if self.revision is not None:
            fields["revision"] = self.revision
        return canonical_json(fields)


@dataclass(frozen=True)
class MethodVariant:
    """One method with one value per parameter (a list in the spec gives several variants).
    ``bits`` / ``group_sizes`` set in the method's entry replace the spec's axes for it."""

    name: str
    params: dict[str, Any]
    bits: tuple[int, ...] | None = None
    group_sizes: tuple[int, ...] | None = None

    @cached_property
    def canonical(self) -> str:
        return canonical_json(self.params)


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    task: str
    path: str
    limit: int | None
    settings: dict[str, Any]

    @cached_property
    def canonical(self) -> str:
        return canonical_json({"name": self.name, "task": self.task, "path": self.path,
                               "limit": self.limit, "settings": self.settings})


@dataclass(frozen=True)
class Spec:
    source: str
    name: str
    models: tuple[ModelEntry, ...]
    methods: tuple[MethodVariant, ...]
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    datasets: tuple[DatasetEntry, ...]
    # each calibration a calibrated method's cells are crossed with (empty: none given)
    calibrations: tuple[dict[str, Any], ...]
    exclude: tuple[dict[str, Any], ...]
    seed: int
    cpu_actors: int
    retries: dict[str, int]
    timeout_s: float | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    reuse: bool = True
    sensitivity: Any = None  # orchestrator.sensitivity.Study, or None

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The first calibration (specs with one: the calibration)."""
        return self.calibrations[0] if self.calibrations else None


def canonical_json(payload: Any) -> str:
    """The one canonical JSON encoding behind every hash: sorted keys, no spaces."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


class _Problems:
    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, value: Any, message: str) -> None:
        shown = "" if value is _MISSING else f"={value!r}"
        self.items.append(f"{self.source}: {where}{shown}: {message}")


_MISSING = object()


def load_spec(path: str | Path, max_cells: int = DEFAULT_MAX_CELLS) -> Spec:
    """Read and validate a spec file; raises SpecError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such file; pass the path of a sweep YAML (see sweeps/)"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_spec(raw, source=str(path), max_cells=max_cells)


def parse_spec(raw: Any, source: str = "<spec>", max_cells: int = DEFAULT_MAX_CELLS) -> Spec:
    """Validate a spec given as data; raises SpecError listing every problem."""
    problems = _Problems(source)
    if not isinstance(raw, dict):
        problems.add("(top level)", _MISSING, "a spec is a mapping with keys " + _keys(TOP_LEVEL_KEYS))
        raise SpecError(problems.items)
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.add(str(key), _MISSING, _unknown(key, TOP_LEVEL_KEYS))

    name = raw.get("name", _MISSING)
    if name is _MISSING:
        problems.add("name", _MISSING, "missing; give the sweep a name, e.g. `name: demo`")
    elif not isinstance(name, str) or not NAME_RE.match(name):
        problems.add("name", name, "use letters, digits, '-', '_' or '.'")

    models = _parse_models(raw.get("models", _MISSING), problems)
    defaults = {key: raw[key] for key in METHOD_DEFAULT_KEYS if key in raw}
    for policy in (defaults.get("group_fallback") if isinstance(defaults.get("group_fallback"), list)
                   else [defaults.get("group_fallback", "ragged")]):
        if not isinstance(policy, str) or policy not in ALL_FALLBACKS:
            problems.add("group_fallback", policy, f"allowed: {_keys(sorted(ALL_FALLBACKS))} "
                         "(see tasks/quantize/layers.py)")
            defaults.pop("group_fallback")
            break
    if "overrides" in defaults and not isinstance(defaults["overrides"], list):
        problems.add("overrides", defaults.pop("overrides"),
                     "a list of {pattern, bits, group_size, keep}, e.g. [{pattern: lm_head, bits: 8}]")
    methods = _parse_methods(raw.get("methods", _MISSING), problems, defaults)
    # the spec's axes are needed by methods that take them and do not set their own
    uses_bits = any(get_method(m.name).uses_bits and m.bits is None for m in methods)
    uses_groups = any(get_method(m.name).uses_group_size and m.group_sizes is None for m in methods)
    bits = _int_list(raw, "bits", problems, required=uses_bits, check=lambda b: b > 0,
                     allowed="positive integers, e.g. [3, 4, 8]")
    group_sizes = _int_list(raw, "group_sizes", problems, required=uses_groups,
                            check=lambda g: g > 0 or g == -1,
                            allowed="positive integers or -1 (per output channel)")
    datasets = _parse_datasets(raw.get("datasets", _MISSING), problems)
    from orchestrator.sensitivity import parse_study  # it builds on this module's parsers

    study = parse_study(raw.get("sensitivity"), [m.name for m in models], [d.name for d in datasets], problems,
                        defaults)
    needs_calibration = [m.name for m in methods if get_method(m.name).calibrated(m.params)]
    if study is not None and get_method(study.method.name).calibrated(study.method.params):
        needs_calibration.append(f"sensitivity.method ({study.method.name})")
    calibrations = _parse_calibrations(raw.get("calibration"), needs_calibration, problems)
    exclude = _parse_exclude(raw.get("exclude", []), methods, problems)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.add("seed", seed, "must be an integer")
    cpu_actors = raw.get("cpu_actors", 1)
    if not isinstance(cpu_actors, int) or isinstance(cpu_actors, bool) or cpu_actors < 1:
        problems.add("cpu_actors", cpu_actors, "must be an integer >= 1")

    reuse = raw.get("reuse", True)
    if not isinstance(reuse, bool):
        problems.add("reuse", reuse, "must be true or false")
    retries = _parse_retries(raw.get("retries", {}), problems)
    timeout_s = raw.get("timeout_s")
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool)
                                  or timeout_s <= 0):
        problems.add("timeout_s", timeout_s, "must be a positive number of seconds (or omitted for no limit)")
    profile = _parse_profile(raw.get("profile"), problems)

    if problems.items:
        raise SpecError(problems.items)
    spec = Spec(
        source=source, name=name, models=tuple(models), methods=tuple(methods),
        bits=tuple(bits), group_sizes=tuple(group_sizes), datasets=tuple(datasets),
        calibrations=calibrations, exclude=tuple(exclude), seed=seed, cpu_actors=cpu_actors,
        retries=retries, timeout_s=timeout_s, raw=raw, profile=profile, reuse=reuse, sensitivity=study,
    )
    _check_exclude_values(spec, problems)
    _check_capabilities(spec, problems, max_cells)
    if problems.items:
        raise SpecError(problems.items)
    return spec


def _keys(allowed) -> str:
    return ", ".join(str(a) for a in allowed)


def _unknown(key: Any, allowed) -> str:
    return f"unknown key; {did_you_mean(key, allowed)}allowed: {_keys(allowed)}"


def _entries(value: Any, field_name: str, problems: _Problems, example: str) -> list[dict]:
    if value is _MISSING:
        problems.add(field_name, _MISSING, f"missing; add a list, e.g. `{field_name}: [{example}]`")
        return []
    if not isinstance(value, list) or not value:
        problems.add(field_name, value, f"must be a non-empty list, e.g. [{example}]")
        return []
    entries = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or "name" not in entry and field_name != "exclude":
            problems.add(f"{field_name}[{i}]", entry, f"must be a mapping with a name, e.g. {example}")
            continue
        entries.append((i, entry))
    return entries


def _parse_models(value: Any, problems: _Problems) -> list[ModelEntry]:
    models = []
    for i, entry in _entries(value, "models", problems, "{name: smollm2-135m}"):
        where = f"models[{i}]"
        for key in entry:
            if key not in MODEL_KEYS:
                problems.add(f"{where}.{key}", _MISSING, _unknown(key, MODEL_KEYS))
        name, path = entry["name"], entry.get("path")
        if path is None and name not in KNOWN_MODELS:
            problems.add(f"{where}.path", _MISSING,
                         f"'{name}' is not a model qsweep knows ({_keys(KNOWN_MODELS)}); "
                         "add `path: <local dir | hub id>`")
        elif path is not None and not isinstance(path, str):
            problems.add(f"{where}.path", path, "must be a local directory or a hub id")
        dtype = entry.get("dtype", "float32")
        if dtype not in DTYPES:
            problems.add(f"{where}.dtype", dtype, f"allowed: {_keys(DTYPES)}")
        trust = entry.get("trust_remote_code", False)
        if not isinstance(trust, bool):
            problems.add(f"{where}.trust_remote_code", trust, "must be true or false (default false)")
        revision = entry.get("revision")
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            problems.add(f"{where}.revision", revision, "must be a branch, tag or commit of the hub "
                         "repository, e.g. main or a 40-character commit sha")
        elif revision is not None and isinstance(path, str) and kind(path) != "hub":
            problems.add(f"{where}.revision", revision, f"only a hub id has revisions; {path} is "
                         f"{'a local directory' if kind(path) == 'local' else 'not a hub id'}: remove revision")
        gpus = entry.get("gpus_per_actor", 1)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            problems.add(f"{where}.gpus_per_actor", gpus, "must be a whole number of GPUs, 1 or more "
                         "(default 1; e.g. 2 for a model that needs two GPUs' memory)")
            gpus = 1
        if any(m.name == name for m in models):
            problems.add(f"{where}.name", name, "duplicate model name; names must be unique")
        models.append(ModelEntry(name=str(name), path=path or f"known:{name}", dtype=dtype,
                                 trust_remote_code=trust is True,
                                 revision=revision if isinstance(revision, str) else None,
                                 gpus_per_actor=gpus))
    return models


def _is_axis(key: str, value: Any) -> bool:
    """A list value is a sweep axis, except ``overrides``: a list of mappings is one value (a
    list of such lists sweeps over override sets)."""
    if not isinstance(value, list):
        return False
    if key == "overrides":
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def _parse_methods(value: Any, problems: _Problems, defaults: dict[str, Any] | None = None,
                   ) -> list[MethodVariant]:
    variants: list[MethodVariant] = []
    seen: set[tuple] = set()  # across entries: the same variant twice is one variant
    for i, entry in _entries(value, "methods", problems, "{name: rtn, sym: [true, false]}"):
        where = f"methods[{i}]"
        try:
            info = get_method(entry["name"])
        except UnknownMethod as exc:
            problems.add(f"{where}.name", entry["name"], str(exc).strip("\"'"))
            continue
        fields = info.config.model_fields
        params = {k: v for k, v in entry.items() if k not in ("name", "bits", "group_sizes")}
        axes_override = {}
        for key, uses in (("bits", info.uses_bits), ("group_sizes", info.uses_group_size)):
            if key not in entry:
                continue
            if not uses:
                problems.add(f"{where}.{key}", entry[key], f"'{info.name}' takes no {key.replace('_', ' ')}; remove it")
                continue
            axes_override[key] = _int_list(entry, key, problems, required=True,
                                           check=(lambda b: b > 0) if key == "bits" else (lambda g: g > 0 or g == -1),
                                           allowed="positive integers" + (" or -1" if key != "bits" else ""),
                                           where=f"{where}.{key}")
        for key, default in (defaults or {}).items():  # top-level group_fallback / overrides
            if key in fields and key not in params:
                params[key] = default
        for key in list(params):
            if key not in fields:
                allowed = _keys(fields) if fields else "none (this method takes no parameters)"
                problems.add(f"{where}.{key}", _MISSING, f"unknown parameter of '{info.name}'; "
                             f"{did_you_mean(key, fields)}allowed: {allowed}")
                params.pop(key)
        axes = {k: (v if _is_axis(k, v) else [v]) for k, v in params.items()}
        if "prune" in axes:  # a list inside a prune stage is one more axis
            axes["prune"] = [stage for value in axes["prune"] for stage in _stages(value)]
        if any(len(v) == 0 for v in axes.values()):
            problems.add(where, params, "a parameter list must not be empty")
            continue
        for combo in itertools.product(*axes.values()):
            chosen = dict(zip(axes, combo))
            try:
                config = info.config(**chosen)
            except ValidationError as exc:
                for err in exc.errors():
                    loc = ".".join(str(p) for p in err["loc"])
                    # a whole-config check (two parameters that conflict) has no field of its own
                    problems.add(f"{where}.{loc}" if loc else where, err.get("input"), _pydantic_message(err, info.config))
                break
            normal = identity_params(config)
            key = (info.name, canonical_json(normal))
            key = (*key, tuple(axes_override.get("bits") or ()), tuple(axes_override.get("group_sizes") or ()))
            if key not in seen:  # e.g. zero_point is irrelevant when sym is true
                seen.add(key)
                variants.append(MethodVariant(name=info.name, params=normal,
                                              bits=tuple(axes_override["bits"]) if axes_override.get("bits") else None,
                                              group_sizes=tuple(axes_override["group_sizes"])
                                              if axes_override.get("group_sizes") else None))
    return variants


def identity_params(config: Any) -> dict[str, Any]:
    """A method config's parameters as they enter a cell's identity: fields added after cells were
    stored (``overrides``, ``prune``) are left out when unset, so those cells keep their ids."""
    normal = config.model_dump()
    if not normal.get("overrides", True):
        normal.pop("overrides")  # none: keeps the identity of specs written before overrides
    if "prune" in normal and normal["prune"] is None:
        normal.pop("prune")  # not pruned: keeps the identity of specs written before stages
    return normal


def _stages(value: Any) -> list[Any]:
    """A ``prune:`` value as the stages it sweeps: a mapping whose values include lists gives
    one stage per combination (``{method: sparsegpt, sparsity: [0.5, "2:4"]}`` is two)."""
    if not isinstance(value, dict):
        return [value]
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in value.items()}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _pydantic_message(err: dict, config: type) -> str:
    loc = err["loc"][0] if err["loc"] else None
    field_info = config.model_fields.get(loc) if loc else None
    if loc == "prune" and len(err["loc"]) > 1:  # a field of the stage, not the stage
        from tasks.quantize.configs import PruneStage

        field_info = PruneStage.model_fields.get(str(err["loc"][1]))
        if field_info is None:
            return f"unknown key of a prune stage; allowed: {_keys(PruneStage.model_fields)}"
    elif loc == "prune":  # the stage as a whole (two of its fields conflict): no type to list
        return err["msg"].removeprefix("Value error, ")
    allowed = f"; allowed: {_describe_type(field_info.annotation)}" if field_info is not None else ""
    return f"{err['msg'].removeprefix('Value error, ')}{allowed}"


def _describe_type(annotation: Any) -> str:
    """A type as a spec writer reads it: true or false, 'a' | 'b', an integer, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe_type(a) for a in args if a is not type(None)]
        return " | ".join(parts) + (" | null" if type(None) in args else "")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _int_list(raw: dict, key: str, problems: _Problems, required: bool, check, allowed: str,
              where: str | None = None) -> list[int]:
    where = where or key
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        if required:
            problems.add(where, _MISSING, f"missing; a method in this spec takes it ({allowed})")
        return []
    if not isinstance(value, list) or not value:
        problems.add(where, value, f"must be a non-empty list of {allowed}")
        return []
    good = []
    for i, item in enumerate(value):
        if not isinstance(item, int) or isinstance(item, bool) or not check(item):
            problems.add(f"{where}[{i}]", item, f"allowed: {allowed}")
        elif item in good:
            problems.add(f"{where}[{i}]", item, "duplicate value")
        else:
            good.append(item)
    return good


def _parse_datasets(value: Any, problems: _Problems) -> list[DatasetEntry]:
    datasets: list[DatasetEntry] = []
    for i, entry in _entries(value, "datasets", problems, "{name: pydoc-topics, limit: 8}"):
        where = f"datasets[{i}]"
        name = entry["name"]
        known_task, known_path = KNOWN_DATASETS.get(name, (None, None))
        task_name = entry.get("task", known_task or name)
        try:
            task = get_task(task_name)
        except UnknownTask as exc:
            problems.add(f"{where}.task", task_name, str(exc).strip("\"'") + "; set `task:`")
            continue
        path = entry.get("path", known_path)
        if path is None:
            problems.add(f"{where}.path", _MISSING,
                         f"'{name}' is not a dataset qsweep knows ({_keys(KNOWN_DATASETS)}); "
                         "add `path: <file | hub id>`")
        limit = entry.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            problems.add(f"{where}.limit", limit, "must be a positive integer (or omitted for all)")
        settings = {k: v for k, v in entry.items() if k not in DATASET_KEYS}
        try:
            settings = settings_dump(task.config(**settings))
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    allowed = _keys(DATASET_KEYS + tuple(task.config.model_fields))
                    problems.add(f"{where}.{loc}", _MISSING, f"unknown key for task '{task.name}'; " + _unknown(loc, allowed.split(", ")).removeprefix("unknown key; "))
                else:
                    problems.add(f"{where}.{loc}", err.get("input"), _pydantic_message(err, task.config))
            continue
        if settings.get("num_fewshot") and path is not None and is_local(str(path)) \
                and not settings.get("fewshot_path") and not settings.get("fewshot_from_eval"):
            problems.add(f"{where}.num_fewshot", settings["num_fewshot"],
                         f"lm-eval's '{task.name}' draws its few-shot examples from another split "
                         f"(train) than the evaluated one, and {path} is one file; set `fewshot_path: "
                         "<file of train items>`, or `fewshot_from_eval: true` to draw them from the "
                         "evaluated set (the row says so; not comparable with lm-eval's figures)")
        if any(d.name == name for d in datasets):
            problems.add(f"{where}.name", name, "duplicate dataset name; two entries may share a task, not a name")
        datasets.append(DatasetEntry(name=str(name), task=task.name, path=str(path), limit=limit,
                                     settings=settings))
    return datasets


def _parse_calibrations(value: Any, needed_by: list[str], problems: _Problems) -> tuple[dict, ...]:
    """The calibrations of a spec: one mapping, or a list of them; a list value inside a mapping
    (``samples: [16, 64, 128]``) crosses like any axis. Each is {dataset, samples, seq_len}."""
    if value is None:
        if needed_by:
            problems.add("calibration", _MISSING,
                         f"missing; needed by {_keys(sorted(set(needed_by)))}: add "
                         "`calibration: {dataset: <name or path>, samples: 128, seq_len: 512}`")
        return ()
    entries = value if isinstance(value, list) else [value]
    if not entries:
        problems.add("calibration", value, "an empty list; give one or more {dataset, samples, seq_len}")
        return ()
    calibrations: list[dict] = []
    for i, entry in enumerate(entries):
        where = f"calibration[{i}]" if isinstance(value, list) else "calibration"
        if not isinstance(entry, dict):
            problems.add(where, entry, "must be a mapping {dataset, samples, seq_len}")
            continue
        for key in entry:
            if key not in CALIBRATION_KEYS:
                problems.add(f"{where}.{key}", _MISSING, _unknown(key, CALIBRATION_KEYS))
        axes = {key: entry.get(key, default) for key, default in
                (("dataset", _MISSING), ("samples", 128), ("seq_len", 512))}
        axes = {key: v if isinstance(v, list) else [v] for key, v in axes.items()}
        good = True
        for key, values in axes.items():
            if not values:
                problems.add(f"{where}.{key}", values, "an empty list")
                good = False
            for v in values:
                if key == "dataset" and not isinstance(v, str):
                    problems.add(f"{where}.dataset", v, "a dataset name or path is required")
                    good = False
                elif key != "dataset" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                    problems.add(f"{where}.{key}", v, "must be a positive integer")
                    good = False
        if not good:
            continue
        for dataset, samples, seq_len in itertools.product(*axes.values()):
            calibration = {"dataset": dataset, "samples": samples, "seq_len": seq_len}
            if calibration in calibrations:
                problems.add(where, calibration, "the same calibration twice; remove one")
            else:
                calibrations.append(calibration)
    return tuple(calibrations)


def _parse_profile(value: Any, problems: _Problems) -> ProfileConfig:
    if value is None:
        return ProfileConfig()
    if not isinstance(value, dict):
        problems.add("profile", value, "must be a mapping, e.g. "
                     "{prompt_len: 64, gen_len: 16, batch_sizes: [1, 8], repeats: 3, warmup: 1}")
        return ProfileConfig()
    try:
        return ProfileConfig(**value)
    except ValidationError as exc:
        for err in exc.errors():
            where = "profile" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.add(where, _MISSING, f"unknown key; allowed: {_keys(ProfileConfig.model_fields)}")
            else:
                allowed = ProfileConfig.ALLOWED.get(str(err["loc"][0]) if err["loc"] else "", "")
                problems.add(where, err.get("input"), f"{err['msg']}; allowed: {allowed}")
        return ProfileConfig()


def _parse_exclude(value: Any, methods: list[MethodVariant], problems: _Problems) -> list[dict]:
    if not isinstance(value, list):
        problems.add("exclude", value, "must be a list of rules, e.g. [{method: rtn, bits: 3}]")
        return []
    param_names = {p for m in methods for p in m.params}
    allowed = AXES + tuple(sorted(param_names))
    rules = []
    for i, rule in enumerate(value):
        if not isinstance(rule, dict) or not rule:
            problems.add(f"exclude[{i}]", rule, "must be a non-empty mapping, e.g. {method: rtn, bits: 3}")
            continue
        for key in rule:
            if key not in allowed:
                problems.add(f"exclude[{i}].{key}", _MISSING, "unknown axis; " + _unknown(key, allowed).removeprefix("unknown key; "))
        rules.append({k: (v if isinstance(v, list) else [v]) for k, v in rule.items()})
    return rules


def _parse_retries(value: Any, problems: _Problems) -> dict[str, int]:
    if not isinstance(value, dict):
        problems.add("retries", value, "must be a mapping, e.g. {crash: 2, oom: 2, timeout: 0}")
        return dict(RETRYABLE)
    retries = dict(RETRYABLE)
    for key, count in value.items():
        if key in DETERMINISTIC:
            problems.add(f"retries.{key}", count, f"'{key}' failures are deterministic and never "
                         f"retried; retryable: {_keys(RETRYABLE)}")
        elif key not in RETRYABLE:
            problems.add(f"retries.{key}", _MISSING, "unknown failure class; " + _unknown(key, RETRYABLE).removeprefix("unknown key; "))
        elif not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 10:
            problems.add(f"retries.{key}", count, "must be an integer from 0 to 10")
        else:
            retries[key] = count
    return retries


def _check_exclude_values(spec: Spec, problems: _Problems) -> None:
    """An exclude value that is not on its axis is a typo or a stale rule: say so."""
    axis_values = {
        "model": {m.name for m in spec.models}, "method": {m.name for m in spec.methods},
        "bits": set(spec.bits).union(*(m.bits or () for m in spec.methods)),
        "group_size": set(spec.group_sizes).union(*(m.group_sizes or () for m in spec.methods)),
        "dataset": {d.name for d in spec.datasets},
    }
    for variant in spec.methods:
        for key, value in variant.params.items():
            if key not in ("overrides", "prune"):  # mappings: not exclude axes
                axis_values.setdefault(key, set()).add(value)
    for i, rule in enumerate(spec.exclude):
        for key, values in rule.items():
            for value in values:
                if key in axis_values and value not in axis_values[key]:
                    shown = ", ".join(sorted(repr(v) for v in axis_values[key]))
                    problems.add(f"exclude[{i}].{key}", value, f"not a value of this axis in the spec ({shown}); fix or remove the rule")


def _check_capabilities(spec: Spec, problems: _Problems, max_cells: int) -> None:
    """Grid size, and a grid that some cells remain in after excludes. A cell outside its
    method's capabilities (bits, group size, fallback) is not a spec error: preflight skips it
    with the reason, so one spec can cross methods of different reach."""
    from orchestrator.cells import count_cells, expand  # expansion needs a valid spec

    total = count_cells(spec)
    if total > max_cells:
        problems.add("(grid)", total, f"the spec expands to {total:,} cells before excludes, over the cap of "
                     f"{max_cells:,}; narrow an axis or pass --max-cells {total}")
        return
    cells = expand(spec, sensitivity=False)  # the study's units need the weights: listed at plan time
    if not cells and spec.sensitivity is None:
        problems.add("exclude", _MISSING, "the spec expands to zero cells: the exclude rules "
                     "remove every cell; loosen a rule")
    # An axis value no method of the spec can take is a mistake, not a skip.
    bit_methods = [m for m in spec.methods if get_method(m.name).uses_bits and m.bits is None]
    for i, bits in enumerate(spec.bits):
        if bit_methods and not any(bits in get_method(m.name).caps(m.params).bits for m in bit_methods):
            reach = "; ".join(sorted({f"'{m.name}' supports {{{_keys(sorted(get_method(m.name).caps(m.params).bits))}}}"
                                      for m in bit_methods}))
            problems.add(f"bits[{i}]", bits, f"no method in the spec supports it ({reach}); remove it")


def known_tasks() -> list[str]:
    return sorted(TASKS)


def known_methods() -> list[str]:
    return sorted(METHODS)
