"""The unquantized model's next-token log-probs, for KL divergence of quantized cells.

An actor computes them once per evaluation batch of a dataset with the base model it keeps, and
holds them (float16, on the CPU) up to a byte cap, so every quantized cell of a sweep compares
against the same numbers without re-running the baseline: ``$QSWEEP_REFERENCE_CACHE_MB``
(default 4096) per actor; past the cap, batches are recomputed when needed (same values, more
time).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def cache_cap_bytes() -> int:
    return int(float(os.environ.get("QSWEEP_REFERENCE_CACHE_MB", "4096")) * 2**20)


class BaselineLogprobs:
    """``(batch_key, input_ids) -> log-probs [batch, seq_len - 1, vocab]`` of ``model``."""

    def __init__(self, model: Any, cap_bytes: int | None = None):
        self.model = model
        self.cap_bytes = cache_cap_bytes() if cap_bytes is None else cap_bytes
        self.cached: dict[Any, torch.Tensor] = {}
        self.cached_bytes = 0
        self.forward_passes = 0

    def __call__(self, key: Any, input_ids: torch.Tensor) -> torch.Tensor:
        if key in self.cached:
            return self.cached[key].float()
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids.to(device)).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        self.forward_passes += 1
        size = logprobs.numel() * 2
        if self.cached_bytes + size <= self.cap_bytes:
            # float16 keeps log-probs to ~1e-3 relative: KL differences below that are noise anyway
            self.cached[key] = logprobs.to("cpu", torch.float16)
            self.cached_bytes += size
            return self.cached[key].float()
        return logprobs
