"""Per-cell checks that need no GPU and no model weights.

A cell that cannot run becomes a ``skipped`` row with its reason, never a crash; cells that
will run with a fallback are noted so ``qsweep plan`` can show them.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.cells import Cell
from tasks.catalog import KNOWN_MODELS
from tasks.quantize.registry import get_method

# Layer input widths of a decoder config: attention/MLP inputs (hidden) and MLP down (intermediate).
WIDTH_KEYS = ("hidden_size", "intermediate_size")


@dataclass(frozen=True)
class Verdict:
    skip: bool
    error_class: str | None = None
    reason: str | None = None
    note: str | None = None  # e.g. a group-size fallback the cell will use


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in {".txt", ".jsonl", ".json", ".parquet"}


def model_widths(path: str) -> dict[str, int] | None:
    """Input widths of the model's linear layers from its config.json, when it is at hand."""
    if path.startswith("known:"):
        from tasks.models import cache_dir  # torch-free module-level; the loader imports lazily

        config = cache_dir() / "models" / path.removeprefix("known:") / "config.json"
    else:
        config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config", data)
    return {key: data[key] for key in WIDTH_KEYS if isinstance(data.get(key), int)}


def check(cell: Cell, widths_cache: dict[str, dict[str, int] | None]) -> Verdict:
    model_path = cell.model.path
    if model_path.startswith("known:"):
        known = KNOWN_MODELS[model_path.removeprefix("known:")]
        if importlib.util.find_spec(known.package) is None:
            return Verdict(True, "data", f"model '{known.name}' needs the package '{known.package}': {known.install}")
    elif _looks_local(model_path) and not Path(model_path).expanduser().is_dir():
        return Verdict(True, "data", f"model directory {model_path} does not exist")
    data_path = cell.dataset.path
    if not data_path.startswith("builtin:") and _looks_local(data_path) and not Path(data_path).expanduser().exists():
        return Verdict(True, "data", f"dataset '{cell.dataset.name}': file {data_path} does not exist")

    info = get_method(cell.method)
    if not info.uses_group_size or cell.group_size in (None, -1):
        return Verdict(False)
    if model_path not in widths_cache:
        widths_cache[model_path] = model_widths(model_path)
    widths = widths_cache[model_path]
    if not widths:
        return Verdict(False)
    bad = {key: width for key, width in widths.items() if width % cell.group_size}
    if not bad:
        return Verdict(False)
    described = ", ".join(f"{key}={width}" for key, width in bad.items())
    if not info.non_divisible_groups:
        return Verdict(True, "shape", f"group size {cell.group_size} does not divide {described} "
                       f"and '{info.name}' has no fallback; exclude it or pick a divisor")
    fallback = cell.params.get("fallback", "ragged")
    return Verdict(False, note=f"group size {cell.group_size} does not divide {described}: fallback {fallback}")
