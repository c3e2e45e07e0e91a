"""Few-shot examples come from where lm-eval takes them (its own split), never silently from
the evaluated set."""

from __future__ import annotations

import json

import pytest

from orchestrator.spec import SpecError, parse_spec
from tasks.evaluate.data import FIXTURES
from tasks.evaluate.lmeval import GSM8K, fewshot_source, lm_eval_config


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def dataset(entry: dict):
    spec = parse_spec({"name": "f", "models": [{"name": "m", "path": "/m"}], "methods": [{"name": "baseline"}],
                       "datasets": [entry]})
    return spec.datasets[0]


def test_gsm8k_shots_are_train_items_never_test_items():
    prepared = GSM8K().prepare(dataset({"name": "gsm8k-fixture", "limit": 8, "num_fewshot": 3}), None, seed=0)
    task = prepared.task
    train = {r["question"] for r in records("gsm8k-train")}
    test = {r["question"] for r in records("gsm8k")}
    assert train and not train & test
    evaluated = list(task.test_docs())
    assert {d["question"] for d in evaluated} == test
    for doc in evaluated[:8]:
        prompt = task.fewshot_context(doc, 3)
        assert sum(q in prompt for q in train) == 3  # three shots, each a train item
        assert [q for q in test if q in prompt] == [doc["question"]]  # only the question asked
    assert prepared.shots_from == "gsm8k-train.jsonl"


def test_a_single_local_file_with_shots_is_refused_unless_asked(tmp_path):
    path = tmp_path / "gsm8k-test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records("gsm8k")))
    with pytest.raises(SpecError, match=r"datasets\[0\].num_fewshot=2: lm-eval's 'gsm8k' draws its few-shot"):
        dataset({"name": "g", "task": "gsm8k", "path": str(path), "num_fewshot": 2})
    asked = dataset({"name": "g", "task": "gsm8k", "path": str(path), "num_fewshot": 2, "fewshot_from_eval": True})
    prepared = GSM8K().prepare(asked, None, seed=0)
    assert prepared.shots_from == "the evaluated set (fewshot_from_eval)"
    assert json.loads(json.dumps(asked.settings))["fewshot_from_eval"] is True  # in eval_settings
    train = tmp_path / "gsm8k-train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records("gsm8k-train")))
    given = dataset({"name": "g", "task": "gsm8k", "path": str(path), "num_fewshot": 2, "fewshot_path": str(train)})
    assert GSM8K().prepare(given, None, seed=0).shots_from == "gsm8k-train.jsonl"
    # zero-shot needs no source
    dataset({"name": "g", "task": "gsm8k", "path": str(path), "num_fewshot": 0})


def test_hub_data_takes_lm_evals_own_fewshot_split():
    config = lm_eval_config("gsm8k")
    assert fewshot_source("gsm8k", dataset({"name": "gsm8k", "num_fewshot": 5}), config) == ("openai/gsm8k:main", "train")
    boolq = lm_eval_config("boolq")
    assert fewshot_source("boolq", dataset({"name": "boolq", "num_fewshot": 2}), boolq) == ("google/boolq", "train")
    other = dataset({"name": "gsm8k", "num_fewshot": 5, "fewshot_split": "validation"})
    assert fewshot_source("gsm8k", other, config) == ("openai/gsm8k:main", "validation")
