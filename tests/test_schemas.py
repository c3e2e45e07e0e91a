"""Tasks read every schema they know (issue 18.1), and one that fits none is a named error before
any model loads; hub-path plumbing that needs no server: revisions in the identity, the actors'
environment, secrets kept out of logs, calibration reading only the records it needs."""

from __future__ import annotations

import json
import logging

import pytest

from orchestrator.cells import expand
from orchestrator.spec import SpecError, parse_spec
from tasks.errors import DataError
from tasks.evaluate import fixture_writer


def fixture(name: str) -> list[dict]:
    return [json.loads(x) for x in (fixture_writer.FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def line_level(pages: list[str]) -> list[dict]:
    """WikiText's document-level pages as Salesforce/wikitext's line-level records."""
    return [{"text": line} for page in pages for line in page.splitlines(keepends=True)]


def dataset(path, task="wikitext", **settings):
    spec = parse_spec({"name": "s", "models": [{"name": "m", "path": "/nowhere"}],
                       "methods": [{"name": "baseline"}],
                       "datasets": [{"name": "d", "task": task, "path": str(path), **settings}]})
    return spec.datasets[0]


def test_line_level_wikitext_rebuilds_the_pages():
    from tasks.evaluate.wikitext import articles

    pages = [r["page"] for r in fixture("wikitext")]
    assert articles([r["text"] for r in line_level(pages)]) == pages


def test_line_level_wikitext_is_scored_as_the_gptq_protocol(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from tasks.evaluate.wikitext import WikiText

    pages = [r["page"] for r in fixture("wikitext")]
    lines = [r["text"] for r in line_level(pages)]
    path = write_jsonl(tmp_path / "wiki.test.jsonl", [{"text": t} for t in lines])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prepared = WikiText().prepare(dataset(path, limit=2, seq_len=32, word_limit=2), tokenizer)
    assert prepared.tokens.ids == tokenizer("\n\n".join(lines), add_special_tokens=False)["input_ids"]
    docs = prepared.words.task.test_docs()
    assert [d["page"] for d in docs] == pages  # the word perplexity scores the rebuilt articles


def test_a_schema_that_fits_no_task_schema_names_the_fields_and_the_setting(tmp_path):
    from tasks.evaluate.data import check_schema

    boolq = write_jsonl(tmp_path / "b.jsonl", [{"q": "is it?", "ctx": "it is", "ans": True}])
    with pytest.raises(DataError) as err:
        check_schema(dataset(boolq, task="boolq"))
    message = str(err.value)
    assert "['ans', 'ctx', 'q']" in message and "google/boolq: question, passage, answer" in message
    assert "fields: {question: <your field>, passage: <your field>, answer: <your field>}" in message
    assert check_schema(dataset(boolq, task="boolq", fields={"question": "q", "passage": "ctx",
                                                               "answer": "ans"})) == "google/boolq"
    wiki = write_jsonl(tmp_path / "w.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"\['body'\].*set text_field"):
        check_schema(dataset(wiki))
    assert check_schema(dataset(wiki, text_field="body")) == "documents in 'body'"
    assert check_schema(dataset(wiki.replace("w.jsonl", "w.jsonl"), task="perplexity", text_field="body"))


def test_boolq_in_either_schema_and_through_a_mapping_scores_the_same(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.evaluate.lmeval import BoolQ

    records = fixture("boolq")[:6]
    glue = write_jsonl(tmp_path / "glue.jsonl", [{"question": r["question"], "passage": r["passage"],
                                                   "idx": i, "label": int(r["answer"])} for i, r in enumerate(records)])
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [{"q": r["question"], "ctx": r["passage"], "yes": r["answer"]}
                                                     for r in records])
    google = write_jsonl(tmp_path / "google.jsonl", records)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()

    def per_item(entry):
        result = BoolQ().evaluate(model, tokenizer, BoolQ().prepare(entry, tokenizer))
        return [e.value for e in result.examples]

    reference = per_item(dataset(google, task="boolq"))
    assert per_item(dataset(glue, task="boolq")) == reference
    assert per_item(dataset(mapped, task="boolq", fields={"question": "q", "passage": "ctx", "answer": "yes"})) == reference
    # the few-shot items go through the same mapping
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"q": r["question"], "ctx": r["passage"], "yes": r["answer"]}
                                                   for r in fixture("boolq")[6:10]])
    prepared = BoolQ().prepare(dataset(mapped, task="boolq", num_fewshot=2, fewshot_path=shots,
                                       fields={"question": "q", "passage": "ctx", "answer": "yes"}), tokenizer)
    assert all("question" in doc for doc in prepared.task.fewshot_docs())


def test_a_dataset_in_no_schema_fails_before_the_model_loads(tmp_path):
    from orchestrator.cells import group_cells
    from tasks.worker import WorkerState, run_group_rows

    bad = write_jsonl(tmp_path / "b.jsonl", [{"q": "is it?"}])
    spec = parse_spec({"name": "s", "models": [{"name": "m", "path": str(tmp_path / "no-model")}],
                       "methods": [{"name": "baseline"}],
                       "datasets": [{"name": "d", "task": "boolq", "path": bad}]})
    state = WorkerState(device="cpu")
    (row,) = run_group_rows(group_cells(expand(spec))[0], state).values()
    assert (row["status"], row["error_class"], row["error_stage"]) == ("failed", "data", "load")
    assert "fit no schema of task 'boolq'" in row["error_message"] and state.model_loads == 0


def test_a_pinned_revision_is_part_of_the_identity_and_an_unpinned_one_is_not():
    def cell(**model):
        spec = parse_spec({"name": "s", "models": [{"name": "m", "path": "org/model", **model}],
                           "methods": [{"name": "baseline"}], "datasets": [{"name": "pydoc-topics"}]})
        return expand(spec)[0]

    plain, main, old = cell(), cell(revision="main"), cell(revision="0" * 40)
    assert len({plain.cell_id, main.cell_id, old.cell_id}) == 3
    assert "revision" not in plain.identity()["model"] and old.identity()["model"]["revision"] == "0" * 40
    from orchestrator.cells import identity_columns

    assert identity_columns(old)["model_revision"] == "0" * 40
    with pytest.raises(SpecError, match=r"models\[0\]\.revision.*only a hub id has revisions"):
        parse_spec({"name": "s", "models": [{"name": "m", "path": "./local", "revision": "main"}],
                    "methods": [{"name": "baseline"}], "datasets": [{"name": "pydoc-topics"}]})


def test_actors_get_the_hub_settings_but_not_the_drivers_machine_paths():
    from orchestrator.driver import actor_env

    environ = {"HF_TOKEN": "hf_secret", "HF_ENDPOINT": "http://hub:1", "HF_HUB_CACHE": "/shared/hub",
               "HF_HOME": "/home/me/.cache/hf", "QSWEEP_CACHE": "/home/me/q", "QSWEEP_SCRATCH": "/home/me/s"}
    from orchestrator.driver import actor_secrets

    local = actor_env(environ, cluster=False)
    # one machine: everything but the token, which goes to each actor as an argument (Ray's
    # runtime-env agent logs the runtime env)
    assert {k: local[k] for k in environ if k != "HF_TOKEN"} == {k: v for k, v in environ.items() if k != "HF_TOKEN"}
    assert "HF_TOKEN" not in local and actor_secrets(environ) == {"HF_TOKEN": "hf_secret"}
    cluster = actor_env(environ, cluster=True)
    assert {"HF_ENDPOINT", "HF_HUB_CACHE"} <= set(cluster)
    assert not {"HF_TOKEN", "HF_HOME", "QSWEEP_CACHE", "QSWEEP_SCRATCH"} & set(cluster)
    named = actor_env(environ | {"QSWEEP_FORWARD_ENV": "HF_HOME"}, cluster=True)
    assert named["HF_HOME"] == "/home/me/.cache/hf" and "QSWEEP_SCRATCH" not in named
    job = json.dumps({"runtime_env": {"env_vars": {"HF_TOKEN": "from-the-job"}}})
    assert actor_secrets(environ | {"RAY_JOB_CONFIG_JSON_ENV_VAR": job}) == {}  # the job's own reaches them


def test_log_lines_never_carry_the_token(monkeypatch, caplog):
    from tasks.errors import RedactSecrets

    token = "hf_" + "a1B2c3D4e5" * 3
    monkeypatch.setenv("HF_TOKEN", token)
    logger = logging.getLogger("qsweep.test")
    caplog.handler.addFilter(RedactSecrets())
    logger.warning("header Authorization: Bearer %s", token)
    try:
        raise OSError(f"401 for token {token}")
    except OSError:
        logger.exception("failed")
    assert token not in caplog.text and "***" in caplog.text
    assert all(token not in record.getMessage() for record in caplog.records)


def test_calibration_reads_only_the_records_its_windows_need(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from tasks.calibration import load_calibration

    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"document {i} " + "word " * 40} for i in range(2000)])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    calib = load_calibration({"dataset": path, "samples": 4, "seq_len": 32}, tokenizer)
    assert calib.input_ids.shape == (4, 32)
    assert 1 <= calib.records <= 10  # of 2,000


def test_a_hub_cache_without_flock_is_named_before_any_download(tmp_path, monkeypatch):
    import errno
    import fcntl

    from tasks.models import check_cache_locks

    check_cache_locks(tmp_path / "hub")  # a local disk: flock works, nothing raised

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(DataError, match=r"without flock \(No locks available\).*qsweep fetch SPEC --to DIR"):
        check_cache_locks(tmp_path / "hub")
    assert not list((tmp_path / "hub").iterdir())  # the probe file is gone
