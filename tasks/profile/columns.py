"""Measurements to result-row columns and long metrics, each with its definition.

Headline columns hold batch size 1 (latency is defined there); every batch size's throughput
and memory is also in the long ``metrics`` list as ``<name>@bs<N>``, whose ``definition`` says
device, backend, lengths, warm-up and repeats. Column definitions: ``orchestrator.schema``.
"""

from __future__ import annotations

from typing import Any

from tasks.profile.speed import BatchFigures, SpeedProfile, Spread
from tasks.profile.trackers import PeakMemory


def eval_memory_columns(memory: PeakMemory) -> dict[str, Any]:
    """Peak memory of each kind during a cell's evaluation."""
    return {"peak_rss_bytes": memory.rss_bytes,
            "cuda_peak_allocated_bytes": memory.cuda_allocated_bytes,
            "cuda_peak_reserved_bytes": memory.cuda_reserved_bytes,
            "nvml_peak_process_bytes": memory.nvml_process_bytes}


def _gen_memory(batch: BatchFigures) -> dict[str, int | None]:
    memory = batch.memory
    return {"gen_peak_rss_bytes": memory.rss_bytes,
            "gen_cuda_peak_allocated_bytes": memory.cuda_allocated_bytes,
            "gen_cuda_peak_reserved_bytes": memory.cuda_reserved_bytes,
            "gen_nvml_peak_process_bytes": memory.nvml_process_bytes,
            "gen_kv_cache_bytes": batch.kv_cache_bytes}


def _spread(name: str, spread: Spread) -> dict[str, float]:
    return {name: spread.median, f"{name}_min": spread.min, f"{name}_max": spread.max}


def speed_columns(profile: SpeedProfile) -> dict[str, Any]:
    """The row's profile settings, latency, batch-size-1 throughput and generation memory."""
    config, latency = profile.config, profile.latency
    single = profile.batches[0]
    return {
        "profile_device": profile.device, "profile_backend": profile.backend,
        "profile_prompt_len": config.prompt_len, "profile_gen_len": config.gen_len,
        "profile_batch_sizes": [b.batch_size for b in profile.batches],
        "profile_warmup": config.warmup, "profile_repeats": config.repeats,
        **_spread("ttft_ms", latency.ttft_ms),
        **_spread("tpot_p50_ms", latency.tpot_p50_ms),
        **_spread("tpot_p95_ms", latency.tpot_p95_ms),
        **_spread("throughput_tok_s", single.tokens_per_s),
        **_gen_memory(single),
    }


MEMORY_DEFINITIONS = {
    "gen_peak_rss_bytes": "peak resident set size of the actor process (CPU memory, {rss})",
    "gen_cuda_peak_allocated_bytes": "peak bytes in live torch CUDA tensors "
                                     "(torch.cuda.max_memory_allocated)",
    "gen_cuda_peak_reserved_bytes": "peak bytes torch's CUDA caching allocator held "
                                    "(torch.cuda.max_memory_reserved)",
    "gen_nvml_peak_process_bytes": "peak GPU memory of the actor process per NVML, sampled every 20 ms",
    "gen_kv_cache_bytes": "bytes of the KV cache tensors at the end of a run "
                          "(prompt + generated tokens)",
}


def speed_metrics(profile: SpeedProfile) -> list[dict[str, Any]]:
    """Throughput and memory at every batch size, as long metrics with definitions."""
    config = profile.config
    setting = (f"{profile.backend} greedy decode with KV cache on {profile.device}; prompt "
               f"{config.prompt_len} tokens from the dataset, {config.gen_len} new tokens per "
               f"sequence; {config.warmup} warm-up run(s) excluded")
    metrics = []
    for batch in profile.batches:
        bs, spread = batch.batch_size, batch.tokens_per_s
        throughput = (f"output tokens/s at batch size {bs} ({bs}x{config.gen_len} tokens / run "
                      f"wall time, prefill included); {setting}")
        for stat, value in (("", spread.median), ("_min", spread.min), ("_max", spread.max)):
            what = {"": "median", "_min": "min", "_max": "max"}[stat]
            metrics.append(_metric(f"throughput_tok_s{stat}@bs{bs}", value, spread.n,
                                   f"{what} over {spread.n} runs of {throughput}"))
        rss = ("exact kernel high-water mark" if batch.memory.rss_method == "VmHWM"
               else "sampled every 20 ms")
        for name, value in _gen_memory(batch).items():
            if value is not None:
                what = MEMORY_DEFINITIONS[name].format(rss=rss)
                metrics.append(_metric(f"{name}@bs{bs}", float(value), spread.n,
                                       f"{what}, during the warm-up and timed runs at batch size "
                                       f"{bs}; {setting}"))
    return metrics


def _metric(metric: str, value: float, n: int, definition: str) -> dict[str, Any]:
    return {"metric": metric, "value": value, "stderr": None, "n": n, "definition": definition}
