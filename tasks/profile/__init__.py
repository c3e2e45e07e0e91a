"""Profiling a cell after its evaluation: measurements are dataclasses, trackers are context
managers.

- ``config``: the spec's ``profile:`` block (torch-free; the spec parser imports it).
- ``trackers``: ``Timer`` (wall time, CUDA synchronised) and ``MemoryTracker`` (peak memory of
  every kind the device has: RSS; torch CUDA allocated / reserved; NVML process memory).
- ``speed``: latency (time to first token, per-output-token p50 / p95) and throughput at each
  batch size, with prompts drawn from the cell's dataset, repeated with the spread kept.
- ``sizes``: weight bytes and bits per weight as a packed format stores them.

This package imports no torch at import time (``speed`` and ``columns`` do), so the spec
parser can read ``config``.
"""

from tasks.profile.sizes import WeightSize, profile_sizes, weight_size
from tasks.profile.trackers import Elapsed, MemoryTracker, PeakMemory, Timer

__all__ = ["Elapsed", "MemoryTracker", "PeakMemory", "Timer", "WeightSize", "profile_sizes", "weight_size"]
