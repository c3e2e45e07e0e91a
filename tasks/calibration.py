"""Calibration data for methods that need it: token windows, and input-activation statistics
of each linear layer measured on the unquantized model.

```yaml
calibration: {dataset: pydoc-topics, samples: 32, seq_len: 256}
```

``dataset`` is a name qsweep knows (``pydoc-topics``, ``wikitext-fixture``, ... see
``tasks.evaluate.registry.KNOWN_DATASETS``) or a path / hub id. Its documents are joined by
blank lines into one token stream (no special tokens) and cut into ``samples`` non-overlapping
windows of ``seq_len`` tokens from the start: deterministic, no sampling. A source with fewer
tokens gives fewer windows (the row's ``calibration_tokens`` says how many tokens were used).
Hub ids are read from their ``train`` split, so that calibration never sees a test split.

The statistics do not depend on bits or group size: an actor computes them once per (model,
calibration spec), only for methods whose registry entry says ``needs_activation_stats`` (gsq:
GPTQ, AWQ and SmoothQuant engines measure what they need themselves), keeps them on the host,
and every quantization group of a sweep reuses them (``tasks.worker``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from tasks.errors import DataError
from tasks.evaluate.data import Reading
from tasks.evaluate.perplexity import token_stream, windows
from tasks.evaluate.registry import KNOWN_DATASETS, get_task
from tasks.quantize.layers import linear_layers

log = logging.getLogger(__name__)
CALIBRATION_SPLIT = "train"


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows of a calibration spec: ``input_ids`` is [windows, seq_len], int64, CPU."""

    spec: dict[str, Any]
    input_ids: torch.Tensor
    token_hash: str  # sha256 of the int64 token ids, row-major
    records: int = 0  # records of the dataset read to fill the windows

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


@dataclass(frozen=True)
class LayerStats:
    """Input activations of one linear layer over the calibration tokens (float32)."""

    mean_abs: torch.Tensor  # [in_features]: mean |x| per input channel
    gram: torch.Tensor  # [in_features, in_features]: X^T X / tokens (output error of any W' is exact from it)
    tokens: int


@dataclass(frozen=True)
class Calibration:
    """What a calibrated method receives as ``calib``: the windows and each layer's statistics."""

    data: CalibrationSet
    stats: dict[str, LayerStats]


def calibration_texts(dataset: str) -> Reading:
    """Documents of a calibration dataset (a known name, a local path or a hub id), read
    lazily: a hub dataset is streamed (offline: read from the cache ``qsweep fetch`` filled),
    and only the records the windows need are read."""
    if dataset in KNOWN_DATASETS:
        task, path = KNOWN_DATASETS[dataset]
        text_field = get_task(task).config.model_fields.get("text_field")
        return Reading(path, CALIBRATION_SPLIT, text_field.default if text_field else None)
    return Reading(dataset, CALIBRATION_SPLIT, "text")


def load_calibration(spec: dict[str, Any], tokenizer: Any) -> CalibrationSet:
    """Tokenize ``spec`` = {dataset, samples, seq_len} into non-overlapping windows."""
    samples, seq_len = spec["samples"], spec["seq_len"]
    texts = calibration_texts(spec["dataset"])
    ids = token_stream(tokenizer, texts, samples * seq_len)
    log.info("calibration set %s: %d records read%s", spec["dataset"], texts.records,
             " (streamed)" if texts.streamed else "")
    windows = min(samples, len(ids) // seq_len)
    if windows == 0:
        raise DataError(f"calibration set {spec['dataset']}: {len(ids)} tokens, fewer than one "
                        f"window of seq_len={seq_len}; lower calibration.seq_len or use more text")
    if windows < samples:
        log.warning("calibration set %s: %d tokens give %d of %d windows of %d", spec["dataset"],
                    len(ids), windows, samples, seq_len)
    input_ids = torch.tensor(ids[:windows * seq_len], dtype=torch.int64).reshape(windows, seq_len)
    token_hash = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()
    return CalibrationSet(spec=dict(spec), input_ids=input_ids, token_hash=token_hash, records=texts.records)


def stats_budget(device: Any) -> int | None:
    """Bytes the accumulating statistics may take on ``device`` at once: a quarter of what is
    free on an accelerator (the model and the forward pass need the rest); None (no cap) on the
    host, where they end up anyway. ``QSWEEP_STATS_BUDGET_MB`` overrides."""
    if os.environ.get("QSWEEP_STATS_BUDGET_MB"):
        return int(float(os.environ["QSWEEP_STATS_BUDGET_MB"]) * 2**20)
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free // 4
    return None


def stats_passes(widths: list[int], budget: int | None) -> list[list[int]]:
    """Indices of the layers (by input width) whose statistics accumulate together in one pass
    over the calibration windows: consecutive layers while their ``in x in`` + ``in`` float32
    fit ``budget`` (one layer a pass at least; everything in one pass without a budget)."""
    passes: list[list[int]] = [[]]
    used = 0
    for i, width in enumerate(widths):
        need = (width * width + width) * 4
        if budget is not None and passes[-1] and used + need > budget:
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += need
    return [p for p in passes if p]


def activation_stats(model: Any, data: CalibrationSet, batch_size: int = 8,
                     budget_bytes: int | None = -1) -> dict[str, LayerStats]:
    """Per linear layer (output head excluded), statistics of its inputs over the calibration
    windows, from forward hooks on ``model`` as it is (call it on the unquantized model).

    The ``in x in`` matrices accumulate on the model's device only for as many layers as
    ``budget_bytes`` holds (default: ``stats_budget``; None: all at once), then move to the host;
    the windows are run once per such pass (Llama-3.1-8B's 39 GB of statistics never sit on an
    80 GB GPU beside its weights)."""
    device = next(model.parameters()).device
    layers = linear_layers(model)
    budget = stats_budget(device) if budget_bytes == -1 else budget_bytes
    stats: dict[str, LayerStats] = {}
    for chosen in stats_passes([m.in_features for _, m in layers], budget):
        stats |= _stats_pass(model, [layers[i] for i in chosen], data, batch_size, device)
    return stats


def _stats_pass(model: Any, layers: list[tuple[str, Any]], data: CalibrationSet, batch_size: int,
                device: Any) -> dict[str, LayerStats]:
    sums = {name: torch.zeros(m.in_features, device=device) for name, m in layers}
    grams = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in layers}
    counts = dict.fromkeys(sums, 0)

    def hook(name: str):
        def accumulate(module: Any, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach().reshape(-1, module.in_features).float()
            sums[name] += x.abs().sum(dim=0)
            grams[name] += x.T @ x
            counts[name] += x.shape[0]
        return accumulate

    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    try:
        with torch.inference_mode():
            for first in range(0, data.input_ids.shape[0], batch_size):
                model(data.input_ids[first:first + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # kept on the host: the accelerator holds them only while they accumulate
    out = {}
    for name in list(sums):
        if counts[name]:
            out[name] = LayerStats((sums[name] / counts[name]).cpu(), (grams[name] / counts[name]).cpu(),
                                   counts[name])
        del sums[name], grams[name]
    return out


OVERLAP_NGRAM = 32


def _ngram_hashes(ids: torch.Tensor, n: int) -> torch.Tensor:
    """One int64 hash per ``n``-gram of each row of ``ids`` (wrapping polynomial hash)."""
    rows = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids.reshape(1, -1)
    if rows.shape[1] < n:
        return torch.empty(0, dtype=torch.int64)
    grams = rows.unfold(1, n, 1).reshape(-1, n).to(torch.int64)
    powers = torch.full((n,), 1_000_003, dtype=torch.int64).cumprod(0)  # wraps: a hash, not a count
    return (grams * powers).sum(-1)


def calibration_overlap(calibration_ids: torch.Tensor, prepared: Any, n: int = OVERLAP_NGRAM) -> float | None:
    """Share of the evaluation stream's ``n``-token sequences that also occur in the calibration
    windows: 0 for disjoint text, near 1 when a cell is evaluated on its own calibration data.
    None for tasks whose prepared data is not a token stream."""
    stream = prepared if hasattr(prepared, "ids") else getattr(prepared, "tokens", None)
    if stream is None or not hasattr(stream, "ids"):
        return None
    seq_len = stream.settings["seq_len"]
    spans = windows(len(stream.ids), seq_len, stream.settings.get("stride") or seq_len, stream.limit)
    ids = stream.ids[:spans[-1][1]] if spans else stream.ids  # the tokens the windows score
    evaluated = _ngram_hashes(torch.tensor(ids, dtype=torch.int64), n)
    if evaluated.numel() == 0:
        return None
    seen = _ngram_hashes(calibration_ids.reshape(-1), n)  # the windows are consecutive pieces of one stream
    return torch.isin(evaluated, seen).float().mean().item()
