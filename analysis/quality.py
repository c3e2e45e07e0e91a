"""Quality metrics the analysis knows: direction, per-example record, paired test. One table.

Every view, ``recommend`` and the report read directions from here (registered in DuckDB as
``metric_directions``), so "lower is better" is said once. A metric absent from this table
(throughput, memory, ``tokens_scored``) is not a quality metric and gets no delta.

- ``higher_is_better``: accuracy-type metrics and MRR go up; perplexity, NLL and rank go down.
- ``example_metric``: the per-example record (``examples`` view) the cell-level value is built
  from, so a quantized cell and its baseline can be compared example by example.
- ``test``: ``mcnemar`` (exact, two-sided) for 0/1 outcomes; ``paired-bootstrap`` for
  continuous ones (per-window NLL, per-document NLL per word, reciprocal rank).
- ``scale``: how the metric follows from the mean of its example records: ``mean`` (accuracy
  is the mean of 0/1, MRR the mean reciprocal rank) or ``exp`` (perplexity = exp(mean NLL);
  for word perplexity, whose NLL is pooled over words, the paired uncertainty is approximate).
"""

from __future__ import annotations

import math
from typing import Literal

import pyarrow as pa

Test = Literal["mcnemar", "paired-bootstrap"]

# metric: (higher_is_better, example_metric, test, scale)
QUALITY_METRICS: dict[str, tuple[bool, str | None, Test | None, str]] = {
    "acc": (True, "acc", "mcnemar", "mean"),
    "acc_norm": (True, None, None, "mean"),
    "exact_match_strict": (True, "exact_match_strict", "mcnemar", "mean"),
    "exact_match_flexible": (True, "exact_match_flexible", "mcnemar", "mean"),
    "acc@1": (True, "acc@1", "mcnemar", "mean"),
    "mrr@10": (True, "reciprocal_rank@10", "paired-bootstrap", "mean"),
    "mean_rank": (False, "rank", "paired-bootstrap", "mean"),
    "token_perplexity": (False, "window_nll", "paired-bootstrap", "exp"),
    "token_nll": (False, "window_nll", "paired-bootstrap", "mean"),
    "word_perplexity": (False, "doc_nll_per_word", "paired-bootstrap", "exp"),
    "byte_perplexity": (False, None, None, "mean"),
    "bits_per_byte": (False, None, None, "mean"),
}

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
SIGNIFICANCE = 0.05  # a quantized cell better than its baseline at this p-value is flagged
# nats per token: a <= 4-bit cell closer to its baseline than this has not changed the model
# measurably. On SmolLM2-135M its own Q4_1 grid reproduced at 4 bits g32 gives KL 0.0 with rtn
# float offsets (earlier run) and 1.6e-4 with hqq, whose fp16 scales and zeros round it
# (sweeps/methods.yaml, which also measured: best real 4-bit cell, gptq g16, 0.069; 8-bit rtn
# g16 6e-4; int8 weight-only 3e-3).
NO_CHANGE_KL = 1e-3


def higher_is_better(metric: str) -> bool | None:
    """Direction of ``metric``; None when it is not a quality metric."""
    entry = QUALITY_METRICS.get(metric)
    return None if entry is None else entry[0]


def directions_table() -> pa.Table:
    """The table above as Arrow, registered as ``metric_directions``."""
    names = list(QUALITY_METRICS)
    return pa.table({
        "metric": names,
        "higher_is_better": [QUALITY_METRICS[m][0] for m in names],
        "example_metric": [QUALITY_METRICS[m][1] for m in names],
        "test": [QUALITY_METRICS[m][2] for m in names],
        "scale": [QUALITY_METRICS[m][3] for m in names],
    })


def paired_bootstrap_p(diffs: list[float] | None) -> float | None:
    """Two-sided p-value of "mean paired difference is 0" by a paired bootstrap.

    The differences are centred on 0 (the null), resampled with replacement
    ``BOOTSTRAP_RESAMPLES`` times with a fixed seed, and p = (1 + #{|mean*| >= |mean|}) / (B + 1).
    Deterministic: the same records give the same p-value.
    """
    import numpy as np

    if not diffs:
        return None
    d = np.asarray(diffs, dtype=np.float64)
    if not np.all(np.isfinite(d)):
        return None
    observed = abs(d.mean())
    centred = d - d.mean()
    if observed == 0.0:
        return 1.0
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    exceed, done = 0, 0
    chunk = max(1, min(BOOTSTRAP_RESAMPLES, 2_000_000 // len(d)))
    while done < BOOTSTRAP_RESAMPLES:
        b = min(chunk, BOOTSTRAP_RESAMPLES - done)
        means = centred[rng.integers(0, len(d), size=(b, len(d)))].mean(axis=1)
        exceed += int(np.count_nonzero(np.abs(means) >= observed - 1e-12))
        done += b
    return (1 + exceed) / (BOOTSTRAP_RESAMPLES + 1)


def mcnemar_p(better: int, worse: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs (the SQL view computes the
    same in DuckDB; this one is for tests and callers outside SQL)."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
