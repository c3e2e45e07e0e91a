"""Measurements as dataclasses, filled by context-manager trackers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

from tasks.quantize.base import QuantReport


@dataclass
class Elapsed:
    seconds: float = 0.0


class Timer:
    """Wall time of a block (``time.perf_counter``); synchronizes CUDA when it is in use."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.result = Elapsed()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def __enter__(self) -> Elapsed:
        self._sync()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc: Any) -> None:
        self._sync()
        self.result.seconds = time.perf_counter() - self._start


@dataclass
class PeakMemory:
    rss_bytes: int = 0  # peak resident set size of this process during the block


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds while the block runs."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.result = PeakMemory()
        self._stop = threading.Event()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.result.rss_bytes = max(self.result.rss_bytes, process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.result.rss_bytes = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.result

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.result.rss_bytes = max(self.result.rss_bytes, psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class WeightSize:
    weight_bytes: int
    source: str  # "stored" | "packed-arithmetic"
    bits_per_weight: float | None
    params_total: int
    params_quantized: int


def weight_size(model: Any, report: QuantReport) -> WeightSize:
    """Bytes of all weights: quantized layers counted as codes + scales + zeros, the rest at
    their dtype (tied tensors once)."""
    quantized = {layer.name: layer for layer in report.quantized_layers}
    modules = dict(model.named_modules())
    quantized_ptrs = {modules[name].weight.data_ptr() for name in quantized}
    seen, dense_bytes, total = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        if p.data_ptr() not in quantized_ptrs:
            dense_bytes += p.numel() * p.element_size()
    packed_bits = sum(layer.stored_bits() for layer in quantized.values())
    return WeightSize(
        weight_bytes=dense_bytes + (packed_bits + 7) // 8,
        source="stored" if report.weight_format == "dense" else "packed-arithmetic",
        bits_per_weight=report.bits_per_weight(),
        params_total=total,
        params_quantized=sum(layer.codes for layer in quantized.values()),
    )


def profile_sizes(model: Any, report: QuantReport) -> dict[str, Any]:
    """Size columns of a row: weight bytes, bits per weight, layer counts, format, kernel."""
    from tasks.models import model_bytes

    size = weight_size(model, report)
    quantized = report.quantized_layers
    return {
        "weight_bytes": size.weight_bytes, "weight_bytes_source": size.source,
        "bits_per_weight": size.bits_per_weight, "params_total": size.params_total,
        "params_quantized": size.params_quantized, "layers_quantized": len(quantized),
        "layers_fallback": sum(1 for layer in quantized if layer.fallback),
        "layers_high_precision": sum(1 for layer in report.layers if not layer.quantized),
        "fallback": report.fallback, "weight_format": report.weight_format,
        "kernel": report.kernel, "model_bytes_in_memory": model_bytes(model),
    }
