"""qsweep export and the artifact cache, on the tiny Llama."""

from __future__ import annotations

import json

import pytest

PROFILE = {"prompt_len": 4, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}


def _spec(tiny_llama, datasets, method=None):
    from orchestrator.spec import parse_spec

    return parse_spec({
        "name": "export", "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [method or {"name": "rtn", "sym": False}], "bits": [3 if method is None else 4],
        "group_sizes": [32], "calibration": {"dataset": "pydoc-topics", "samples": 4, "seq_len": 64},
        "datasets": [{"name": name, "task": "perplexity", "path": "builtin:pydoc-topics", "limit": limit,
                      "seq_len": 32} for name, limit in datasets],
        "profile": PROFILE})


def _run(spec, state, store):
    from inline import run_inline

    from orchestrator.cells import identity_columns

    rows = [{**identity_columns(cell), **row} for cell, row in run_inline(spec, state)]
    store.write_rows(rows)
    return rows


def test_export_reloads_with_the_same_perplexity(tiny_llama, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.cli import main
    from orchestrator.store import Store
    from tasks.evaluate.perplexity import TokenPerplexity
    from tasks.worker import WorkerState

    monkeypatch.delenv("QSWEEP_ARTIFACT_CACHE", raising=False)
    spec = _spec(tiny_llama, [("pydoc", 2)])
    (row,) = _run(spec, WorkerState(threads=1), Store(tmp_path / "results"))
    out = tmp_path / "export"
    assert main(["export", row["cell_id"][:10], "--out", str(out), "--results", str(tmp_path / "results")]) == 0
    assert "(dequantized)" in capsys.readouterr().out
    manifest = json.loads((out / "qsweep_export.json").read_text())
    assert manifest["cell_id"] == row["cell_id"] and manifest["format"] == "dequantized"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    data = TokenPerplexity().prepare(spec.datasets[0], tokenizer)
    reloaded = TokenPerplexity().evaluate(model, tokenizer, data).primary.value
    assert reloaded == pytest.approx(row["primary_value"], rel=1e-5)
    # an unknown id and a non-empty folder are usage errors
    assert main(["export", "zzzz", "--out", str(tmp_path / "x"), "--results", str(tmp_path / "results")]) == 2
    assert main(["export", row["cell_id"], "--out", str(out), "--results", str(tmp_path / "results")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_artifact_cache_skips_quantization_for_a_new_dataset(tiny_llama, tmp_path, monkeypatch):
    from orchestrator.store import Store
    from tasks.artifacts import ArtifactCache
    from tasks.worker import WorkerState

    monkeypatch.setenv("QSWEEP_ARTIFACT_CACHE", str(tmp_path / "artifacts"))
    store = Store(tmp_path / "results")
    (first,) = _run(_spec(tiny_llama, [("a", 2)]), WorkerState(threads=1), store)
    assert first["artifact_cache_hit"] is False and first["time_quantize_s"] > 0
    # a later run (fresh actor) adds a dataset: same quantization group, taken from the cache
    rows = _run(_spec(tiny_llama, [("a", 2), ("b", 3)]), WorkerState(threads=1), store)
    by_dataset = {r["dataset"]: r for r in rows}
    assert all(r["artifact_cache_hit"] is True and r["time_quantize_s"] == 0.0 for r in rows)
    assert by_dataset["a"]["primary_value"] == first["primary_value"]  # the same quantized weights
    assert by_dataset["a"]["layers"] == first["layers"]
    # the cap: an entry alone over the cap is not stored
    small = ArtifactCache(tmp_path / "tiny-cap", cap_bytes=1000)
    cached = ArtifactCache(tmp_path / "artifacts", cap_bytes=10**12).get(first["group_id"])
    small.put("g", cached.model, cached.report, cached.columns)
    assert small.get("g") is None


@pytest.mark.parametrize(("engine", "fmt", "rel"), [
    ("gptqmodel", "gptq", 0.01),               # bf16 packed kernels: not bit-equal
    ("llmcompressor", "compressed-tensors", 1e-4),
])
def test_export_packed_checkpoint_loads_in_transformers(tiny_llama, tmp_path, monkeypatch, capsys,
                                                        engine, fmt, rel):
    """A packed checkpoint exported by cell id (GPTQ from GPTQModel, compressed-tensors
    pack-quantized from llm-compressor): transformers loads it (GPTQ through optimum) and gets the
    sweep's perplexity."""
    pytest.importorskip({"gptqmodel": "gptqmodel", "llmcompressor": "llmcompressor"}[engine])
    if engine == "gptqmodel":
        pytest.importorskip("optimum")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.cli import main
    from orchestrator.store import Store
    from tasks.evaluate.perplexity import TokenPerplexity
    from tasks.worker import WorkerState

    monkeypatch.delenv("QSWEEP_ARTIFACT_CACHE", raising=False)
    spec = _spec(tiny_llama, [("pydoc", 2)], {"name": "gptq", "engine": engine, "sym": False})
    (row,) = _run(spec, WorkerState(threads=1), Store(tmp_path / "results"))
    assert row["status"] == "ok", row.get("error_message")
    out = tmp_path / f"{engine}-export"
    assert main(["export", row["cell_id"], "--out", str(out), "--results", str(tmp_path / "results")]) == 0
    assert f"({fmt})" in capsys.readouterr().out
    assert json.loads((out / "qsweep_export.json").read_text())["format"] == fmt
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == ("gptq" if engine == "gptqmodel" else "compressed-tensors")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    if engine == "gptqmodel":  # packed modules, not dense ones
        assert not any(isinstance(m, torch.nn.Linear) and "layers" in name for name, m in model.named_modules())
    tokenizer = AutoTokenizer.from_pretrained(out)
    data = TokenPerplexity().prepare(spec.datasets[0], tokenizer)
    reloaded = TokenPerplexity().evaluate(model, tokenizer, data).primary.value
    assert reloaded == pytest.approx(row["primary_value"], rel=rel)
