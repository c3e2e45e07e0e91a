"""The bridge to lm-evaluation-harness: its own task definitions, on local files or hub ids.

lm-eval's YAML config for the task (``boolq``, ``gsm8k``, ``wikitext``) is loaded as it ships
(its ``metadata.version`` is recorded as the task version), then only the data source is
changed: a local file or fixture becomes the ``json`` builder with ``data_files``; a hub id
stays a hub id. Few-shot count, sample limit and seed come from the cell. The task object
(data loaded, documents built) is prepared once per dataset per actor and reused.

```yaml
datasets:
  - {name: boolq, path: data/boolq.jsonl, limit: 200}
  - {name: gsm8k, path: openai/gsm8k:main, limit: 100, num_fewshot: 5}
```
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import DataError
from tasks.evaluate.base import EvalResult, Example, Metric, proportion
from tasks.evaluate.data import local_file, rename

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    name: str
    task: Any  # lm_eval ConfigurableTask, documents loaded
    version: str
    limit: int | None
    batch_size: int
    seed: int
    shots_from: str = ""  # where few-shot examples came from, for the metric's definition


# lm-eval's own definitions, by their place in lm_eval/tasks (indexing every task takes ~10 s).
LM_EVAL_YAML = {"boolq": "super_glue/boolq/default.yaml", "gsm8k": "gsm8k/gsm8k.yaml",
                "wikitext": "wikitext/wikitext.yaml"}


def lm_eval_config(name: str) -> dict[str, Any]:
    """lm-eval's shipped config for ``name``, with its ``!function`` entries resolved."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / LM_EVAL_YAML[name]
    return dict(load_yaml(path, resolve_func=True, recursive=True))


def fewshot_source(name: str, dataset: Any, config: dict[str, Any]) -> tuple[Path | str | None, str]:
    """Where ``dataset``'s few-shot examples come from: (local file, hub id, or None for the
    evaluated data itself; its split), lm-eval's own definition unless the entry says otherwise."""
    settings = dataset.settings
    split = settings.get("fewshot_split") or config.get("fewshot_split") or config.get("training_split") or "train"
    if settings.get("fewshot_path"):
        shots = local_file(settings["fewshot_path"])
        return (shots if shots is not None else settings["fewshot_path"]), split
    if settings.get("fewshot_from_eval"):
        return None, settings["split"]
    if dataset.path.startswith("builtin:"):
        train = _fixture(f"{dataset.path}-train")
        if train is not None:
            return train, split
    elif local_file(dataset.path) is None:
        return dataset.path, split  # the same hub dataset's own split
    raise DataError(f"dataset '{dataset.name}' ({dataset.path}): lm-eval's '{name}' takes its few-shot "
                    f"examples from '{split}', and this dataset is one file; set fewshot_path (a file of "
                    "train items) or fewshot_from_eval: true")


def _fixture(path: str) -> Path | None:
    """The builtin fixture file ``path`` names, or None when qsweep ships none."""
    try:
        return local_file(path)
    except DataError:
        return None


def prepare_task(name: str, dataset: Any, split_kind: str, overrides: dict[str, Any],
                 num_fewshot: int, seed: int) -> Prepared:
    """Build lm-eval's task ``name`` on the cell's data; DataError if the data is not there.
    Few-shot examples come from ``fewshot_source`` with lm-eval's own sampler."""
    from lm_eval.api.task import ConfigurableTask

    config = lm_eval_config(name)
    version = str(config.get("metadata", {}).get("version", "?"))
    split = dataset.settings["split"]
    shots, shots_split = fewshot_source(name, dataset, config) if num_fewshot else (None, None)
    for kind in ("training_split", "validation_split", "test_split", "fewshot_split"):
        config.pop(kind, None)
    config[split_kind] = split
    local = local_file(dataset.path)
    if local is not None:
        files = {split: str(local)}
        if num_fewshot and shots is None:  # fewshot_from_eval: lm-eval leaves the evaluated item out
            config["fewshot_split"] = split
        elif num_fewshot:
            if not isinstance(shots, Path):
                raise DataError(f"dataset '{dataset.name}': fewshot_path {shots} must be a local file "
                                f"when the evaluated data ({dataset.path}) is one")
            files["fewshot"] = str(shots)
            config["fewshot_split"] = "fewshot"
        config |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}
    else:
        hub, _, subset = dataset.path.partition(":")
        config |= {"dataset_path": hub, "dataset_name": subset or None, "dataset_kwargs": None}
        if num_fewshot:
            if isinstance(shots, Path) or (shots is not None and shots != dataset.path):
                raise DataError(f"dataset '{dataset.name}': fewshot_path {shots} must name the same hub "
                                f"dataset ({dataset.path}); give fewshot_split for another of its splits")
            config["fewshot_split"] = shots_split
    if not num_fewshot:
        described = ""
    elif shots is None:
        described = "the evaluated set (fewshot_from_eval)"
    elif isinstance(shots, Path):
        described = shots.name
    else:
        described = f"{shots} split {shots_split}"
    config |= overrides | {"num_fewshot": num_fewshot}
    if dataset.settings.get("fields"):
        config["process_docs"] = FieldRename(dataset.settings["fields"])
    config.pop("tag", None)
    try:
        task = ConfigurableTask(config=config)
    except Exception as exc:  # noqa: BLE001 - any failure to find or read data is a data error
        raise DataError(f"dataset '{dataset.name}' ({dataset.path}, split {split}) could not be "
                        f"loaded for lm-eval task '{name}': {type(exc).__name__}: {str(exc)[:300]}") from None
    if hasattr(task, "set_fewshot_seed"):
        task.set_fewshot_seed(seed=seed)
    return Prepared(name=name, task=task, version=version, limit=dataset.limit,
                    batch_size=dataset.settings["batch_size"], seed=seed, shots_from=described)


@dataclass(frozen=True)
class FieldRename:
    """lm-eval ``process_docs`` for a dataset entry's ``fields`` mapping: each split's records
    (few-shot ones included) get the task's field names."""

    fields: dict[str, str]

    def __call__(self, docs: Any) -> Any:
        return docs.map(rename, fn_kwargs={"fields": self.fields})


def shots_phrase(prepared: Prepared) -> str:
    shots = prepared.task.config.num_fewshot
    return f"{shots}-shot" + (f" (shots from {prepared.shots_from}, lm-eval's sampler)" if shots else "")


def run(prepared: Prepared, model: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Evaluate and return lm-eval's per-document samples."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    random.seed(prepared.seed)
    np.random.seed(prepared.seed)
    torch.manual_seed(prepared.seed)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=prepared.batch_size)
    out = evaluate(lm, {prepared.name: prepared.task}, limit=prepared.limit, log_samples=True,
                   bootstrap_iters=0, verbosity="ERROR")
    return out["samples"][prepared.name]


class BoolQ:
    """lm-eval ``boolq`` on either schema: google/boolq's ``answer`` (bool) or SuperGLUE's
    ``label`` (what lm-eval's own definition reads)."""

    def prepare(self, dataset: Any, tokenizer: Any, seed: int = 0) -> Prepared:
        return prepare_task("boolq", dataset, "validation_split",
                            {"doc_to_target": "{{ label if label is defined else (1 if answer else 0) }}"},
                            dataset.settings["num_fewshot"], seed)

    def evaluate(self, model: Any, tokenizer: Any, prepared: Prepared) -> EvalResult:
        samples = run(prepared, model, tokenizer)
        outcomes = [float(s["acc"]) for s in samples]
        acc = proportion("acc", outcomes, f"accuracy: the answer (' yes' / ' no') with the higher "
                         f"log-likelihood is right; lm-eval boolq v{prepared.version}, "
                         f"{shots_phrase(prepared)}")
        return EvalResult(primary=acc, metrics=[acc], task_version=f"lm-eval boolq {prepared.version}",
                          examples=[Example(str(s["doc_id"]), "acc", o) for s, o in zip(samples, outcomes)])


class GSM8K:
    """lm-eval ``gsm8k``: greedy generation, exact match after the strict and flexible filters."""

    def prepare(self, dataset: Any, tokenizer: Any, seed: int = 0) -> Prepared:
        config = lm_eval_config("gsm8k")
        generation = dict(config["generation_kwargs"]) | {"max_gen_toks": dataset.settings["max_gen_toks"]}
        return prepare_task("gsm8k", dataset, "test_split", {"generation_kwargs": generation},
                            dataset.settings["num_fewshot"], seed)

    def evaluate(self, model: Any, tokenizer: Any, prepared: Prepared) -> EvalResult:
        samples = run(prepared, model, tokenizer)
        by_filter: dict[str, dict[int, float]] = {}
        for s in samples:
            by_filter.setdefault(s["filter"], {})[s["doc_id"]] = float(s["exact_match"])
        gen = prepared.task.config.generation_kwargs.get("max_gen_toks")
        metrics, examples = [], []
        for filter_name, short in (("strict-match", "strict"), ("flexible-extract", "flexible")):
            values = by_filter.get(filter_name, {})
            if not values:
                continue
            name = f"exact_match_{short}"
            metrics.append(proportion(name, list(values.values()),
                                      f"exact match of the number after '#### ' ({filter_name} filter) "
                                      f"with the reference; greedy, at most {gen} new tokens; "
                                      f"lm-eval gsm8k v{prepared.version}, {shots_phrase(prepared)}"))
            examples += [Example(str(doc), name, v) for doc, v in sorted(values.items())]
        return EvalResult(primary=metrics[0], metrics=metrics, examples=examples,
                          task_version=f"lm-eval gsm8k {prepared.version}")


def word_perplexity(prepared: Prepared, model: Any, tokenizer: Any) -> tuple[list[Metric], list[Example]]:
    """lm-eval ``wikitext``: rolling log-likelihood per document, per word / byte."""
    samples = run(prepared, model, tokenizer)
    docs = []
    for s in samples:
        loglik, words = s["word_perplexity"]
        _, nbytes = s["byte_perplexity"]
        docs.append((float(loglik), int(words), int(nbytes)))
    total_ll = sum(d[0] for d in docs)
    metrics = []
    for name, index, unit in (("word_perplexity", 1, "word"), ("byte_perplexity", 2, "byte")):
        units = sum(d[index] for d in docs)
        rate = -total_ll / units  # nats per unit
        se = _ratio_stderr([-d[0] for d in docs], [d[index] for d in docs])
        value = math.exp(rate)
        metrics.append(Metric(name, value, value * se if se is not None else None, len(docs),
                              f"{unit}-level perplexity: exp(total NLL / {unit}s) over {len(docs)} "
                              f"documents, rolling log-likelihood (lm-eval wikitext v{prepared.version}); "
                              f"stderr by the delta method over documents"))
    bits_se = _ratio_stderr([-d[0] / math.log(2) for d in docs], [d[2] for d in docs])
    metrics.append(Metric("bits_per_byte", -total_ll / sum(d[2] for d in docs) / math.log(2), bits_se,
                          len(docs), f"bits per UTF-8 byte: total NLL / bytes / ln 2 over {len(docs)} "
                          f"documents (lm-eval wikitext v{prepared.version})"))
    examples = [Example(str(s["doc_id"]), "doc_nll_per_word", -d[0] / max(d[1], 1)) for s, d in zip(samples, docs)]
    return metrics, examples


def _ratio_stderr(numerators: list[float], denominators: list[int]) -> float | None:
    """Standard error of sum(x)/sum(w) over documents (linearisation)."""
    n = len(numerators)
    if n < 2:
        return None
    ratio = sum(numerators) / sum(denominators)
    mean_w = sum(denominators) / n
    residuals = [x - ratio * w for x, w in zip(numerators, denominators)]
    variance = sum(r * r for r in residuals) / (n - 1)
    return math.sqrt(variance / n) / mean_w
