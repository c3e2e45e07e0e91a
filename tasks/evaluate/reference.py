"""The unquantized model's next-token log-probs, for KL divergence of quantized cells.

An actor computes them once per dataset with the base model it keeps, before any quantized cell
of the group evaluates (``precompute``: outside every cell's timers and memory trackers), one
entry per evaluation window, so a cell that halves its batch after an out-of-memory error finds
the same entries. Entries are float16 on the CPU up to ``$QSWEEP_REFERENCE_CACHE_MB`` (4096)
per actor, then in a disk file under the scratch folder up to ``$QSWEEP_REFERENCE_DISK_GB``
(64): a 128k vocabulary holds 0.5 GB per 2048-token window, so large vocabularies spill to disk
instead of being recomputed inside every cell. Only windows past both caps are recomputed when a
cell asks for them (same values, more time; a warning says so).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def cache_cap_bytes() -> int:
    return int(float(os.environ.get("QSWEEP_REFERENCE_CACHE_MB", "4096")) * 2**20)


def disk_cap_bytes() -> int:
    return int(float(os.environ.get("QSWEEP_REFERENCE_DISK_GB", "64")) * 2**30)


class BaselineLogprobs:
    """``(window keys, input_ids) -> log-probs [batch, seq_len - 1, vocab]`` of ``model``, one
    stored entry per window key."""

    def __init__(self, model: Any, cap_bytes: int | None = None, disk_cap: int | None = None,
                 spill_dir: str | Path | None = None):
        self.model = model
        self.cap_bytes = cache_cap_bytes() if cap_bytes is None else cap_bytes
        self.disk_cap = disk_cap_bytes() if disk_cap is None else disk_cap
        self.spill_dir = spill_dir
        self.cached: dict[Any, torch.Tensor] = {}  # in memory
        self.spilled: dict[Any, tuple[int, tuple[int, ...]]] = {}  # key -> (offset, shape) on disk
        self.cached_bytes = 0
        self.disk_bytes = 0
        self._file: Any = None
        self.forward_passes = 0
        self.recomputed = 0  # windows a cell had to recompute (past both caps)
        self.overflowed: set[Any] = set()  # keys computed once that fitted neither cap

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids.to(device)).logits[:, :-1].float()
        self.forward_passes += 1
        return torch.log_softmax(logits, dim=-1)

    def precompute(self, batches: Any) -> None:
        """Store the entries of ``batches`` (an iterable of ``(keys, input_ids)``) not stored yet."""
        for keys, input_ids in batches:
            missing = [i for i, key in enumerate(keys) if not self.has(key)]
            if not missing:
                continue
            logprobs = self._forward(input_ids[missing])
            for row, i in enumerate(missing):
                self._store(keys[i], logprobs[row])

    def has(self, key: Any) -> bool:
        return key in self.cached or key in self.spilled

    def _store(self, key: Any, logprobs: torch.Tensor) -> None:
        half = logprobs.to("cpu", torch.float16)
        size = half.numel() * 2
        if self.cached_bytes + size <= self.cap_bytes:
            # float16 keeps log-probs to ~1e-3 relative: KL differences below that are noise anyway
            self.cached[key] = half
            self.cached_bytes += size
        elif self.disk_bytes + size > self.disk_cap:
            self.overflowed.add(key)
        else:
            if self._file is None:
                directory = Path(self.spill_dir or tempfile.gettempdir())
                directory.mkdir(parents=True, exist_ok=True)
                self._file = tempfile.TemporaryFile(dir=directory, prefix="qsweep-reference-")
            self._file.seek(self.disk_bytes)
            self._file.write(half.numpy().tobytes())
            self.spilled[key] = (self.disk_bytes, tuple(half.shape))
            self.disk_bytes += size

    def _load(self, key: Any) -> torch.Tensor | None:
        if key in self.cached:
            return self.cached[key].float()
        if key in self.spilled:
            offset, shape = self.spilled[key]
            self._file.seek(offset)
            count = int(np.prod(shape))
            data = np.frombuffer(self._file.read(count * 2), dtype=np.float16).reshape(shape)
            return torch.from_numpy(data.astype(np.float32))
        return None

    def __call__(self, keys: list[Any], input_ids: torch.Tensor) -> torch.Tensor:
        """Stored entries where there are; the others are computed now (and stored if they fit),
        inside the calling cell's timers: ``precompute`` first to keep them out."""
        rows = [self._load(key) for key in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            again = sum(keys[i] in self.overflowed for i in missing)
            if again and not self.recomputed:
                log.warning("reference log-probs past QSWEEP_REFERENCE_CACHE_MB and QSWEEP_REFERENCE_DISK_GB: "
                            "recomputed inside the cell (its time and memory include it)")
            self.recomputed += again
            fresh = self._forward(input_ids[missing]).cpu()
            for row, i in enumerate(missing):
                self._store(keys[i], fresh[row])
                stored = self._load(keys[i])  # every cell compares against the same (float16) numbers
                rows[i] = fresh[row] if stored is None else stored
        return torch.stack(rows)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
