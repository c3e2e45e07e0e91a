"""Quality metrics the analysis knows: direction, per-example record, paired test. One table.

Every view, ``recommend`` and the report read directions from here (registered in DuckDB as
``metric_directions``), so "lower is better" is said once. A metric absent from this table
(throughput, memory, ``tokens_scored``) is not a quality metric and gets no delta.

- ``higher_is_better``: accuracy-type metrics and MRR go up; perplexity, NLL and rank go down.
- ``example_metric``: the per-example record (``examples`` view) the cell-level value is built
  from, so a quantized cell and its baseline can be compared example by example.
- ``test``: ``mcnemar`` for 0/1 outcomes (exact binomial on the discordant pairs up to
  ``MCNEMAR_EXACT_MAX`` of them, else chi-square with continuity correction); ``sign-flip`` for
  continuous ones (per-window NLL, per-document NLL per word, reciprocal rank): the paired
  permutation test of "the mean paired difference is 0", exact (all 2^n sign patterns) up to
  ``SIGN_FLIP_EXACT_MAX_N`` pairs, Monte-Carlo (``SIGN_FLIP_RESAMPLES`` random patterns, fixed
  seed, p = (1 + #as extreme) / (B + 1)) beyond. A p-value is never below the smallest the test
  can attain (its ``resolution``: 2 / 2^n exact, 1 / (B + 1) Monte-Carlo, 2 / 2^n McNemar), and
  the 95% interval of the mean paired difference inverts the same test (the shifts it does not
  reject at 5%), so "0 outside the interval" and "p < 0.05" always agree; with n <= 5 pairs no
  shift can be rejected and the interval is unbounded (null).
- ``scale``: how the metric follows from the mean of its example records: ``mean`` (accuracy
  is the mean of 0/1, MRR the mean reciprocal rank) or ``exp`` (perplexity = exp(mean NLL);
  for word perplexity, whose NLL is pooled over words, the paired uncertainty is approximate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import pyarrow as pa

Test = Literal["mcnemar", "sign-flip"]

# metric: (higher_is_better, example_metric, test, scale)
QUALITY_METRICS: dict[str, tuple[bool, str | None, Test | None, str]] = {
    "acc": (True, "acc", "mcnemar", "mean"),
    "acc_norm": (True, None, None, "mean"),
    "exact_match_strict": (True, "exact_match_strict", "mcnemar", "mean"),
    "exact_match_flexible": (True, "exact_match_flexible", "mcnemar", "mean"),
    "acc@1": (True, "acc@1", "mcnemar", "mean"),
    "mrr@10": (True, "reciprocal_rank@10", "sign-flip", "mean"),
    "mean_rank": (False, "rank", "sign-flip", "mean"),
    "token_perplexity": (False, "window_nll", "sign-flip", "exp"),
    "token_nll": (False, "window_nll", "sign-flip", "mean"),
    "word_perplexity": (False, "doc_nll_per_word", "sign-flip", "exp"),
    "byte_perplexity": (False, None, None, "mean"),
    "bits_per_byte": (False, None, None, "mean"),
}

SIGN_FLIP_EXACT_MAX_N = 16  # 2^16 = 65,536 sign patterns, enumerated
SIGN_FLIP_RESAMPLES = 10_000  # Monte-Carlo sign patterns beyond that: resolution 1e-4
SIGN_FLIP_SEED = 0
MCNEMAR_EXACT_MAX = 1000  # discordant pairs up to which McNemar is the exact binomial test
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


@dataclass(frozen=True)
class PairedTest:
    """A paired test's answer: its name, p-value, the smallest p-value it could attain, and (for
    the sign-flip test) the 95% interval of the mean paired difference that inverts it."""

    test: str
    p_value: float
    resolution: float
    ci95_low: float | None = None
    ci95_high: float | None = None


def _sign_patterns(n: int) -> Any:
    """Every +-1 pattern of length n (exact) or SIGN_FLIP_RESAMPLES seeded random ones."""
    import numpy as np

    if n <= SIGN_FLIP_EXACT_MAX_N:
        codes = np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n)[None, :]
        return (1 - 2 * (codes & 1)).astype(np.int8)
    rng = np.random.default_rng(SIGN_FLIP_SEED)
    return (1 - 2 * rng.integers(0, 2, size=(SIGN_FLIP_RESAMPLES, n))).astype(np.int8)


@lru_cache(maxsize=4096)
def _sign_flip(diffs: tuple[float, ...]) -> PairedTest | None:
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0 or not np.all(np.isfinite(d)):
        return None
    n = d.size
    exact = n <= SIGN_FLIP_EXACT_MAX_N
    # Null distribution of the sum under sign flips of (d - shift): a - shift * b, per pattern.
    a, b = [], []
    patterns = _sign_patterns(n)
    rows_per_chunk = max(1, 4_000_000 // n)  # about 32 MB of float64 at a time
    for start in range(0, len(patterns), rows_per_chunk):
        chunk = patterns[start:start + rows_per_chunk].astype(np.float64)
        a.append(chunk @ d)
        b.append(chunk.sum(axis=1))
    a, b = np.concatenate(a), np.concatenate(b)
    scale = max(1.0, float(np.abs(d).max())) * n * 1e-12  # ties within rounding count as ties

    def p_at(shift: float) -> float:
        observed = abs(d.sum() - n * shift)
        extreme = int(np.count_nonzero(np.abs(a - shift * b) >= observed - scale))
        return extreme / len(a) if exact else (1 + extreme) / (len(a) + 1)

    resolution = 2.0 / 2**n if exact else 1.0 / (len(a) + 1)
    p = p_at(0.0)
    low = high = None
    if resolution < SIGNIFICANCE:  # else no shift is ever rejected: the interval is unbounded
        mean, spread = float(d.mean()), float(d.max() - d.min()) + abs(float(d.mean())) + 1e-12
        low = _boundary(p_at, mean, mean - 2 * spread)
        high = _boundary(p_at, mean, mean + 2 * spread)
    return PairedTest("sign-flip-exact" if exact else "sign-flip-monte-carlo", max(p, resolution),
                      resolution, low, high)


def _boundary(p_at: Any, inside: float, outside: float, steps: int = 60) -> float:
    """The shift between ``inside`` (not rejected) and ``outside`` (rejected) where the test
    starts rejecting at SIGNIFICANCE, by bisection."""
    for _ in range(steps):
        middle = (inside + outside) / 2
        if p_at(middle) < SIGNIFICANCE:
            outside = middle
        else:
            inside = middle
    return inside


def sign_flip_test(diffs: list[float] | None) -> PairedTest | None:
    """The paired sign-flip test of "mean paired difference is 0" (two-sided) and the 95%
    interval that inverts it; None without finite differences. Deterministic."""
    if not diffs:
        return None
    return _sign_flip(tuple(float(x) for x in diffs))


def sign_flip_p(diffs: list[float] | None) -> float | None:
    result = sign_flip_test(diffs)
    return None if result is None else result.p_value


def mcnemar_test(better: int, worse: int) -> PairedTest:
    """McNemar's test on the discordant pairs: the exact two-sided binomial test up to
    MCNEMAR_EXACT_MAX of them, chi-square with continuity correction (1 df) beyond."""
    n = better + worse
    if n == 0:
        return PairedTest("mcnemar-exact", 1.0, 1.0)
    if n <= MCNEMAR_EXACT_MAX:
        k = min(better, worse)
        log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                     for i in range(k + 1)]
        return PairedTest("mcnemar-exact", min(1.0, 2 * sum(math.exp(t) for t in log_terms)),
                          min(1.0, 2 * 0.5**n))
    statistic = (abs(better - worse) - 1) ** 2 / n
    return PairedTest("mcnemar-chi2-cc", math.erfc(math.sqrt(statistic / 2)), 0.0)


def mcnemar_p(better: int, worse: int) -> float:
    return mcnemar_test(better, worse).p_value
