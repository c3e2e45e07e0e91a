"""``qsweep fetch SPEC``: download every hub model, dataset and calibration set a spec names, so
that compute nodes without internet run it offline.

Models are downloaded with ``huggingface_hub.snapshot_download`` (the files that loading and
quantizing read, ``tasks.models.MODEL_FILES``, at the spec's ``revision``); datasets and hub
calibration sets with ``datasets.load_dataset`` (every split of the named config: evaluation,
few-shot and calibration splits alike), into the caches the workers read:
``$HF_HUB_CACHE`` / ``$HF_DATASETS_CACHE`` (or under ``$HF_HOME``), or with ``--to DIR`` into
``DIR/hub`` and ``DIR/datasets`` on shared storage. The nodes then run with
``HF_HUB_CACHE=DIR/hub HF_DATASETS_CACHE=DIR/datasets HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``
(the driver forwards all four to every actor).

Local paths, ``builtin:`` data and catalogued (``known:``) models need nothing and are listed
as such. A refusal by the hub (a gated model without access) names the model and what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import Spec
from tasks.evaluate.registry import KNOWN_DATASETS
from tasks.locations import kind


@dataclass(frozen=True)
class Item:
    what: str  # 'model' | 'dataset' | 'calibration set'
    name: str  # hub id (``owner/name`` or ``owner/name:config``)
    revision: str | None = None


def items(spec: Spec) -> tuple[list[Item], list[str]]:
    """(hub items to download, what needs no download), each once, in spec order."""
    wanted: dict[tuple[str, str | None], Item] = {}
    local: list[str] = []
    for model in spec.models:
        if kind(model.path) == "hub":
            wanted.setdefault((model.path, model.revision), Item("model", model.path, model.revision))
        else:
            local.append(f"model {model.name}: {model.path} (not on the hub)")
    for dataset in spec.datasets:
        paths = [dataset.path] + [p for p in [dataset.settings.get("fewshot_path")] if p]
        for path in paths:
            if kind(path) == "hub":
                wanted.setdefault((path, None), Item("dataset", path))
            else:
                local.append(f"dataset {dataset.name}: {path} (not on the hub)")
    for calibration in spec.calibrations:
        path = KNOWN_DATASETS.get(calibration["dataset"], (None, calibration["dataset"]))[1]
        if kind(path) == "hub":
            wanted.setdefault((path, None), Item("calibration set", path))
    return list(wanted.values()), sorted(set(local))


def caches(to: str | None) -> tuple[str | None, str | None]:
    """(hub cache, datasets cache) to download into: ``--to DIR``'s, or None for the clients'
    own (``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``, ``HF_HOME``)."""
    if to is None:
        return None, None
    root = Path(to).expanduser().resolve()
    return str(root / "hub"), str(root / "datasets")


def fetch_item(item: Item, hub_cache: str | None, datasets_cache: str | None) -> str:
    """Download one item; returns what it fetched (the commit, the splits)."""
    from tasks.errors import AccessError, access_advice, hub_refusal
    from tasks.models import MODEL_FILES

    if item.what == "model":
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(item.name, revision=item.revision, allow_patterns=MODEL_FILES,
                                       cache_dir=hub_cache)
        except Exception as exc:
            refusal = hub_refusal(exc)
            if refusal:
                raise AccessError(access_advice("model", item.name, refusal)) from None
            raise
        return f"commit {Path(folder).name}"
    import datasets

    from tasks.evaluate.data import hub_data_error

    name, _, config = item.name.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None, cache_dir=datasets_cache)
    except Exception as exc:  # noqa: BLE001 - named, with what to do
        raise hub_data_error(item.name, None, exc) from None
    return ", ".join(f"{split} {len(rows):,} records" for split, rows in loaded.items())


def offline_env(to: str | None) -> str:
    """The environment compute nodes run the fetched spec with."""
    hub_cache, datasets_cache = caches(to)
    where = f"HF_HUB_CACHE={hub_cache} HF_DATASETS_CACHE={datasets_cache} " if to else ""
    return f"{where}HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"


def hub_reachable() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") != "1" and os.environ.get("HF_DATASETS_OFFLINE") != "1"
