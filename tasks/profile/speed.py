"""Latency and throughput of a model as it is held (dequantized or packed), on CPU or GPU.

Every run is a greedy decode loop over the model's own forward with its KV cache, as
transformers' ``generate`` runs it (prefill keeps only the last position's logits), producing
exactly ``gen_len`` new tokens (no sampling, no stop at EOS). Prompts are the first
``batch × prompt_len`` tokens of the cell's dataset, cut into consecutive slices, unpadded
(reused in order when the dataset is shorter).

- time to first token (TTFT): prefill of the prompt and the first greedy token;
- per-output-token latency (TPOT): each of the ``gen_len − 1`` decode steps after it; p50 and
  p95 over the steps of a run (linear interpolation);
- throughput: ``batch × gen_len`` output tokens / wall time of the run (prefill included).

Latency is measured at batch size 1, throughput at every batch size of the ``profile:`` block.
At each batch size, ``warmup`` runs are made and discarded, then ``repeats`` timed runs; each
figure is the median over the timed runs, with min and max. On GPU each step end is a CUDA
event, read after one synchronisation at the end of the run (no host stall between steps);
on CPU it is ``time.perf_counter``. A dequantized model's speed is that of its dense matmuls:
it says nothing about a packed format (the row's ``kernel`` column says which path ran).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from tasks.errors import DataError, UnsupportedError
from tasks.evaluate.data import prompt_texts
from tasks.evaluate.perplexity import token_stream
from tasks.profile.config import ProfileConfig
from tasks.profile.trackers import MemoryTracker, PeakMemory

BACKEND = "transformers"


@dataclass(frozen=True)
class Spread:
    """Median of repeated measurements, with min and max."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class Run:
    """One timed generation: prefill (to the first token) and each decode step, in seconds."""

    prefill_s: float
    step_s: tuple[float, ...]
    kv_cache_bytes: int  # KV cache tensors at the end of the run

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.step_s)


@dataclass(frozen=True)
class Latency:
    """At batch size 1, in milliseconds."""

    ttft_ms: Spread
    tpot_p50_ms: Spread
    tpot_p95_ms: Spread


@dataclass(frozen=True)
class BatchFigures:
    """Throughput, memory and step latency at one batch size (the row's headline latency is
    batch size 1's: ``SpeedProfile.latency``)."""

    batch_size: int
    tokens_per_s: Spread
    memory: PeakMemory  # over the warm-up and timed runs at this batch size
    kv_cache_bytes: int
    latency: Latency | None = None  # TTFT and decode-step p50/p95 at this batch size, in ms


@dataclass(frozen=True)
class SpeedProfile:
    config: ProfileConfig
    device: str  # "cpu <processor>" | "cuda:N <GPU name>"
    backend: str
    latency: Latency
    batches: tuple[BatchFigures, ...]  # ascending batch size, 1 first


class StepClock:
    """Marks step ends: CUDA events on GPU (read after one synchronize), perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list[Any] = []

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed_generate(model: Any, input_ids: torch.Tensor, gen_len: int, clock: StepClock) -> Run:
    """Greedy-decode exactly ``gen_len`` tokens after ``input_ids`` with the KV cache, timing
    the prefill and every decode step."""
    keep_last = ({"logits_to_keep": 1}
                 if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
    with torch.inference_mode():
        clock.start()
        out = model(input_ids=input_ids, use_cache=True, **keep_last)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        clock.mark()
        for _ in range(gen_len - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            clock.mark()
        intervals = clock.intervals()
        kv_bytes = cache_bytes(out.past_key_values)
    return Run(prefill_s=intervals[0], step_s=tuple(intervals[1:]), kv_cache_bytes=kv_bytes)


def cache_bytes(cache: Any) -> int:
    """Bytes of a KV cache's tensors (transformers' ``Cache`` layers, or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    else:
        tensors = [t for pair in cache for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def dataset_prompts(tokenizer: Any, dataset: Any, prompt_len: int, count: int) -> torch.Tensor:
    """``count`` prompts of ``prompt_len`` tokens, as (count, prompt_len): consecutive slices of
    the dataset's token stream (its texts, ``tasks.evaluate.data.prompt_texts``, joined by blank
    lines, no special tokens); a dataset
    with fewer than ``count`` slices has them reused in order."""
    settings = dataset.settings
    texts = prompt_texts(dataset.path, settings.get("split", "test"), settings.get("text_field"))
    ids = token_stream(tokenizer, texts, prompt_len * count)
    slices = len(ids) // prompt_len
    if slices == 0:
        raise DataError(f"dataset {dataset.path}: {len(ids)} tokens, fewer than one profile prompt of "
                        f"{prompt_len}; lower profile.prompt_len")
    stream = torch.tensor(ids[:slices * prompt_len], dtype=torch.long).view(slices, prompt_len)
    return stream[torch.arange(count) % slices]


def device_name(device: str) -> str:
    """``cuda:N <GPU name>`` or ``cpu <processor>``: the device every figure is for."""
    if device.startswith("cuda"):
        index = torch.cuda.current_device() if device == "cuda" else torch.device(device).index
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    processor = ""
    try:
        with open("/proc/cpuinfo") as f:
            processor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"cpu {processor or platform.processor() or platform.machine()}".strip()


def profile_speed(model: Any, tokenizer: Any, dataset: Any, config: ProfileConfig, device: str) -> SpeedProfile:
    """Latency at batch size 1 and throughput + peak memory at each batch size (see module doc)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and config.prompt_len + config.gen_len > context:
        raise UnsupportedError(f"profile prompt_len {config.prompt_len} + gen_len {config.gen_len} exceeds "
                               f"the model's context of {context} tokens; lower them in the profile: block")
    batch_sizes = config.measured_batch_sizes()
    prompts = dataset_prompts(tokenizer, dataset, config.prompt_len, batch_sizes[-1]).to(device)
    clock = StepClock(device)
    runs: dict[int, list[Run]] = {}
    batches = []
    for batch_size in batch_sizes:
        batch = prompts[:batch_size]
        with MemoryTracker(device) as memory:
            for _ in range(config.warmup):
                timed_generate(model, batch, config.gen_len, clock)
            runs[batch_size] = [timed_generate(model, batch, config.gen_len, clock)
                                for _ in range(config.repeats)]
        batches.append(BatchFigures(
            batch_size=batch_size,
            tokens_per_s=Spread.of([batch_size * config.gen_len / r.total_s for r in runs[batch_size]]),
            memory=memory, kv_cache_bytes=runs[batch_size][-1].kv_cache_bytes,
            latency=run_latency(runs[batch_size])))
    return SpeedProfile(config=config, device=device_name(device), backend=BACKEND,
                        latency=run_latency(runs[1]), batches=tuple(batches))


def run_latency(runs: list[Run]) -> Latency:
    """TTFT and decode-step p50 / p95 (over each run's steps) of timed runs, in ms."""
    return Latency(
        ttft_ms=Spread.of([r.prefill_s * 1e3 for r in runs]),
        tpot_p50_ms=Spread.of([percentile(r.step_s, 50) * 1e3 for r in runs]),
        tpot_p95_ms=Spread.of([percentile(r.step_s, 95) * 1e3 for r in runs]),
    )


def percentile(values: tuple[float, ...] | list[float], q: float) -> float:
    """The q-th percentile, linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
