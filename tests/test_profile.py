"""Profiling: trackers measure real work, settings are validated, rows carry every figure.

Speed is never asserted in absolute terms; only relations that real work must show (more
decode steps take longer, a larger batch holds more memory), with sizes that make the
difference large.
"""

from __future__ import annotations

import pytest

from orchestrator.spec import SpecError, parse_spec

GPU_ONLY = ("cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes", "nvml_peak_process_bytes",
            "gen_cuda_peak_allocated_bytes", "gen_cuda_peak_reserved_bytes", "gen_nvml_peak_process_bytes")
PROFILE_COLUMNS = (
    "profile_device", "profile_backend", "profile_prompt_len", "profile_gen_len", "profile_batch_sizes",
    "profile_warmup", "profile_repeats", "ttft_ms", "ttft_ms_min", "ttft_ms_max", "tpot_p50_ms",
    "tpot_p50_ms_min", "tpot_p50_ms_max", "tpot_p95_ms", "tpot_p95_ms_min", "tpot_p95_ms_max",
    "throughput_tok_s", "throughput_tok_s_min", "throughput_tok_s_max", "gen_peak_rss_bytes",
    "gen_kv_cache_bytes", "peak_rss_bytes", "time_profile_s", "kernel", "weight_format",
)


def tiny_spec(tiny_llama, text_file, profile=None, methods=None):
    raw = {
        "name": "profile-test",
        "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": methods or [{"name": "baseline"}],
        "bits": [4], "group_sizes": [32],
        "datasets": [{"name": "corpus", "task": "perplexity", "path": str(text_file), "limit": 2,
                      "seq_len": 64}],
    }
    if profile is not None:
        raw["profile"] = profile
    return parse_spec(raw, source="t.yaml")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama):
    from tasks.models import load_model

    return load_model(str(tiny_llama), "float32", "cpu")


def test_profile_block_validated_with_every_problem(tiny_llama, text_file):
    with pytest.raises(SpecError) as err:
        tiny_spec(tiny_llama, text_file, {"batch_sizes": [0, 8], "gen_len": 1, "repeat": 3, "warmup": -1})
    problems = err.value.problems
    assert "t.yaml: profile.batch_sizes[0]=0: Input should be greater than 0; allowed: a non-empty " \
           "list of distinct positive integers, e.g. [1, 8]" in problems
    assert any(p.startswith("t.yaml: profile.gen_len=1: ") for p in problems)
    assert any(p.startswith("t.yaml: profile.repeat: unknown key; allowed: prompt_len") for p in problems)
    assert any(p.startswith("t.yaml: profile.warmup=-1: ") for p in problems)
    assert len(problems) == 4
    for bad in ({"batch_sizes": [2, 2]}, {"batch_sizes": []}, {"repeats": True}, [1, 8]):
        with pytest.raises(SpecError, match="t.yaml: profile"):
            tiny_spec(tiny_llama, text_file, bad)


def test_profile_settings_are_not_part_of_the_cell_identity(tiny_llama, text_file):
    from orchestrator.cells import expand, group_cells

    default = expand(tiny_spec(tiny_llama, text_file))
    custom = expand(tiny_spec(tiny_llama, text_file, {"prompt_len": 8, "batch_sizes": [2]}))
    assert [c.cell_id for c in default] == [c.cell_id for c in custom]
    assert default[0].profile.batch_sizes == (1, 8)
    assert group_cells(custom)[0].profile.measured_batch_sizes() == (1, 2)


def test_a_longer_generation_takes_longer(model_and_tokenizer):
    import torch

    from tasks.profile.speed import StepClock, timed_generate

    model, _ = model_and_tokenizer
    prompt = torch.arange(3, 35)[None]
    clock = StepClock("cpu")
    threads = torch.get_num_threads()
    # One thread: on a busy machine, a multi-threaded op can stall for a whole scheduler slice
    # waiting for a descheduled peer thread, which swamps the work being compared.
    torch.set_num_threads(1)
    try:
        timed_generate(model, prompt, 4, clock)  # warm-up
        short = [timed_generate(model, prompt, 4, clock) for _ in range(3)]
        long = [timed_generate(model, prompt, 128, clock) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(len(r.step_s) == 3 for r in short) and all(len(r.step_s) == 127 for r in long)
    assert all(s > 0 for r in short + long for s in (r.prefill_s, *r.step_s))
    # 124 more decode steps. Interference (a busy machine) only adds time, so compare the
    # fastest runs: that of the long generation must still be the slower.
    assert min(r.total_s for r in long) > min(r.total_s for r in short)
    assert long[0].kv_cache_bytes > short[0].kv_cache_bytes


def test_a_larger_batch_holds_more_memory(model_and_tokenizer, text_file):
    from orchestrator.spec import DatasetEntry
    from tasks.profile.config import ProfileConfig
    from tasks.profile.speed import profile_speed

    model, tokenizer = model_and_tokenizer
    dataset = DatasetEntry(name="corpus", task="perplexity", path=str(text_file), limit=None,
                           settings={"split": "test", "text_field": "text"})
    config = ProfileConfig(prompt_len=200, gen_len=4, batch_sizes=[256], repeats=1, warmup=0)
    profile = profile_speed(model, tokenizer, dataset, config, "cpu")
    small, large = profile.batches
    assert (small.batch_size, large.batch_size) == (1, 256)
    # The KV cache is held per sequence: exactly 256 times the bytes.
    assert large.kv_cache_bytes == 256 * small.kv_cache_bytes > 0
    # Batch 256 x 200 tokens needs >100 MB more (KV cache, activations); measured after batch 1.
    assert large.memory.rss_bytes > small.memory.rss_bytes + 32 * 2**20
    assert small.memory.cuda_allocated_bytes is None and small.memory.nvml_process_bytes is None
    assert profile.device.startswith("cpu") and profile.backend == "transformers"


def test_run_group_rows_carry_profile_columns(tiny_llama, text_file):
    from orchestrator.cells import expand, group_cells, identity_columns
    from orchestrator.schema import to_table
    from tasks.worker import WorkerState, run_group_rows

    spec = tiny_spec(tiny_llama, text_file,
                     {"prompt_len": 16, "gen_len": 4, "batch_sizes": [1, 2], "repeats": 2, "warmup": 1},
                     methods=[{"name": "baseline"}, {"name": "rtn", "sym": True}])
    state = WorkerState(device="cpu")
    rows = {}
    for group in group_cells(expand(spec)):
        for cell_id, row in run_group_rows(group, state).items():
            cell = next(c for c in group.cells if c.cell_id == cell_id)
            rows[cell.method] = {**identity_columns(cell), **row}
    assert set(rows) == {"baseline", "rtn"}
    to_table(list(rows.values()))  # the row fits the schema
    for method, row in rows.items():
        assert row["status"] == "ok", row.get("error_message")
        missing = [c for c in PROFILE_COLUMNS if row.get(c) is None]
        assert not missing, (method, missing)
        assert all(row.get(c) is None for c in GPU_ONLY), method
        assert row["profile_device"].startswith("cpu") and row["profile_backend"] == "transformers"
        assert (row["profile_prompt_len"], row["profile_gen_len"], row["profile_batch_sizes"]) == (16, 4, [1, 2])
        assert row["ttft_ms_min"] <= row["ttft_ms"] <= row["ttft_ms_max"]
        assert row["tpot_p50_ms"] <= row["tpot_p95_ms_max"]
        metrics = {m["metric"]: m for m in row["metrics"]}
        assert {"throughput_tok_s@bs1", "throughput_tok_s@bs2", "gen_peak_rss_bytes@bs2",
                "gen_kv_cache_bytes@bs2", "token_perplexity"} <= set(metrics)
        assert metrics["throughput_tok_s@bs1"]["value"] == row["throughput_tok_s"]
        assert metrics["gen_kv_cache_bytes@bs2"]["value"] == 2 * row["gen_kv_cache_bytes"]
        assert "batch size 2" in metrics["throughput_tok_s@bs2"]["definition"]
        assert "prompt 16 tokens" in metrics["throughput_tok_s@bs2"]["definition"]
    assert rows["baseline"]["kernel"] == "dense" and rows["rtn"]["kernel"] == "dequantized"


def test_profile_failure_is_a_failed_row_that_keeps_the_evaluation(tiny_llama, text_file):
    from orchestrator.cells import expand, group_cells
    from tasks.worker import WorkerState, run_group_rows

    # The tiny model's context is 256 tokens: a 250-token prompt plus 16 new tokens exceeds it.
    spec = tiny_spec(tiny_llama, text_file, {"prompt_len": 250, "gen_len": 16, "batch_sizes": [1]})
    (group,) = group_cells(expand(spec))
    (row,) = run_group_rows(group, WorkerState(device="cpu")).values()
    assert (row["status"], row["error_stage"], row["error_class"]) == ("failed", "profile", "unsupported")
    assert "context of 256 tokens" in row["error_message"]
    assert row["primary_value"] is not None and row.get("ttft_ms") is None


@pytest.mark.gpu
def test_profile_on_cuda_measures_gpu_memory(tiny_llama, text_file):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible (torch.cuda.is_available() is False)")
    from orchestrator.spec import DatasetEntry
    from tasks.models import load_model
    from tasks.profile.config import ProfileConfig
    from tasks.profile.speed import profile_speed

    model, tokenizer = load_model(str(tiny_llama), "float32", "cuda")
    dataset = DatasetEntry(name="corpus", task="perplexity", path=str(text_file), limit=None,
                           settings={"split": "test", "text_field": "text"})
    config = ProfileConfig(prompt_len=128, gen_len=8, batch_sizes=[64], repeats=2, warmup=1)
    profile = profile_speed(model, tokenizer, dataset, config, "cuda")
    small, large = profile.batches
    assert profile.device.startswith("cuda:") and torch.cuda.get_device_name() in profile.device
    assert 0 < small.memory.cuda_allocated_bytes < large.memory.cuda_allocated_bytes
    assert large.memory.cuda_reserved_bytes >= large.memory.cuda_allocated_bytes
    assert profile.latency.ttft_ms.median > 0 and profile.latency.tpot_p50_ms.median > 0
    if large.memory.nvml_process_bytes is not None:  # None where NVML cannot see this PID
        assert large.memory.nvml_process_bytes >= large.memory.cuda_reserved_bytes
