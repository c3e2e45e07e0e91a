"""The four datasets of the seed paper, offline, through lm-eval and the project's tasks."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.cells import expand, group_cells, identity_columns
from orchestrator.spec import parse_spec
from orchestrator.store import Store
from tasks.evaluate import fixture_writer


def test_fixtures_are_written_by_the_project(tmp_path):
    for written in fixture_writer.write(tmp_path):
        assert written.read_bytes() == (fixture_writer.FIXTURES / written.name).read_bytes(), written.name


def test_fixtures_follow_the_official_schemas():
    def records(name):
        return [json.loads(x) for x in (fixture_writer.FIXTURES / f"{name}.jsonl").read_text().splitlines()]

    assert all(set(r) == {"question", "passage", "answer"} and isinstance(r["answer"], bool) for r in records("boolq"))
    assert all(set(r) == {"question", "answer"} and "\n#### " in r["answer"] for r in records("gsm8k"))
    for r in records("msmarco"):
        assert {"query", "query_id", "query_type", "passages", "answers", "wellFormedAnswers"} == set(r)
        assert set(r["passages"]) == {"is_selected", "passage_text", "url"} and sum(r["passages"]["is_selected"]) == 1
    assert all(set(r) == {"page"} and r["page"].startswith(" = ") for r in records("wikitext"))


def four_dataset_spec(model_path, methods=({"name": "baseline"},), extra=None):
    return parse_spec({
        "name": "four", "models": [{"name": "tiny", "path": str(model_path)}], "methods": list(methods),
        "bits": [4], "group_sizes": [32],
        "datasets": [{"name": "boolq-fixture", "limit": 8},
                     {"name": "gsm8k-fixture", "limit": 3, "num_fewshot": 1, "max_gen_toks": 16},
                     {"name": "msmarco-fixture", "limit": 6},
                     {"name": "wikitext-fixture", "limit": 4, "seq_len": 64, "word_limit": 3},
                     *(extra or [])],
        "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0},
    })


@pytest.fixture(scope="module")
def four_rows(tiny_llama):
    from tasks.worker import WorkerState, run_group_rows

    spec = four_dataset_spec(tiny_llama, methods=({"name": "baseline"}, {"name": "rtn", "sym": False}),
                             extra=[{"name": "lost", "task": "boolq", "path": "/nowhere/boolq.jsonl"}])
    state, rows = WorkerState(device="cpu"), []
    for group in group_cells(expand(spec)):
        partial = run_group_rows(group, state)
        rows += [{**identity_columns(c), "attempts": 1, **partial[c.cell_id]} for c in group.cells]
    return rows


def test_every_dataset_reports_its_metrics_with_stderr_and_n(four_rows):
    ok = {r["dataset"]: r for r in four_rows if r["method"] == "baseline" and r["status"] == "ok"}
    expected = {"boolq-fixture": {"acc"}, "gsm8k-fixture": {"exact_match_strict", "exact_match_flexible"},
                "msmarco-fixture": {"acc@1", "mrr@10"},
                "wikitext-fixture": {"token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}}
    for dataset, names in expected.items():
        metrics = {m["metric"]: m for m in ok[dataset]["metrics"]}
        assert names <= set(metrics), (dataset, set(metrics))
        for name in names:
            m = metrics[name]
            assert m["n"] > 0 and m["definition"] and math.isfinite(m["value"])
            assert m["stderr"] is not None, (dataset, name)
            if name in ("acc", "acc@1", "exact_match_strict", "exact_match_flexible"):
                assert 0 <= m["ci95_low"] <= m["value"] <= m["ci95_high"] <= 1
    assert ok["boolq-fixture"]["task_version"] == "lm-eval boolq 2.0"
    assert ok["gsm8k-fixture"]["task_version"] == "lm-eval gsm8k 3.0"
    assert "lm-eval wikitext 2.0" in ok["wikitext-fixture"]["task_version"]
    word = next(m for m in ok["wikitext-fixture"]["metrics"] if m["metric"] == "word_perplexity")
    token = next(m for m in ok["wikitext-fixture"]["metrics"] if m["metric"] == "token_perplexity")
    assert "word-level" in word["definition"] and "windows of 64 tokens, stride 64" in token["definition"]
    assert ok["boolq-fixture"]["primary_n"] == 8 and ok["msmarco-fixture"]["primary_n"] == 6


def test_missing_dataset_fails_before_quantization(four_rows):
    lost = [r for r in four_rows if r["dataset"] == "lost"]
    assert {(r["status"], r["error_class"], r["error_stage"]) for r in lost} == {("failed", "data", "load")}
    assert all("/nowhere/boolq.jsonl" in r["error_message"] for r in lost)
    assert all(r.get("time_quantize_s") is None for r in lost)


def test_examples_join_quantized_to_baseline(four_rows, tmp_path):
    from analysis.views import connect

    Store(tmp_path).write_rows(four_rows)
    con = connect(str(tmp_path))
    pairs = con.execute("""
        select q.dataset, q.metric, count(*) as pairs,
               sum(case when q.value <> b.value then 1 else 0 end) as changed
        from examples q join examples b
          on q.model = b.model and q.dataset = b.dataset and q.example_id = b.example_id
         and q.metric = b.metric and b.method = 'baseline' and q.method = 'rtn'
        group by q.dataset, q.metric order by q.dataset, q.metric""").fetchall()
    by = {(d, m): n for d, m, n, _ in pairs}
    assert by[("boolq-fixture", "acc")] == 8
    assert by[("msmarco-fixture", "rank")] == 6
    assert by[("gsm8k-fixture", "exact_match_strict")] == 3
    assert by[("wikitext-fixture", "window_nll")] == 4
    assert by[("wikitext-fixture", "doc_nll_per_word")] == 3
    changed = sum(c for d, m, n, c in pairs if m == "window_nll")
    assert changed == 4  # 4-bit RTN moves every window's NLL of a random model


def test_prepared_data_is_reused_across_cells(tiny_llama):
    from tasks.worker import WorkerState

    spec = four_dataset_spec(tiny_llama)
    state = WorkerState(device="cpu")
    state.base_model(str(tiny_llama), "float32")
    cell = expand(spec)[0]
    first = state.prepared_data(cell, state._tokenizer)
    assert state.prepared_data(cell, state._tokenizer) is first
