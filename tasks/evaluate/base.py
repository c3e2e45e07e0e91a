"""The evaluation-task Protocol and its results. Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Metric:
    """A figure with its definition; stored in the long ``metrics`` view."""

    metric: str
    value: float
    stderr: float | None
    n: int
    definition: str
    ci95_low: float | None = None  # accuracy-type metrics: Wilson 95% interval
    ci95_high: float | None = None


@dataclass(frozen=True)
class Example:
    """One example's outcome, for paired comparisons (``examples`` view)."""

    example_id: str
    metric: str
    value: float


@dataclass
class EvalResult:
    primary: Metric
    metrics: list[Metric] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    task_version: str | None = None  # e.g. lm-eval's task version for lm-eval tasks


class EvalTask(Protocol):
    """An evaluation task.

    ``prepare`` reads the data and builds what does not depend on the model's weights (it is
    cached per dataset per actor and raises ``DataError`` before any quantization time is
    spent when the data cannot be found); ``evaluate`` scores a model on it.
    """

    def prepare(self, dataset: Any, tokenizer: Any) -> Any: ...

    def evaluate(self, model: Any, tokenizer: Any, prepared: Any) -> EvalResult: ...


def proportion(name: str, outcomes: list[float], definition: str) -> Metric:
    """Mean of 0/1 outcomes with its standard error and Wilson 95% interval."""
    n = len(outcomes)
    p = sum(outcomes) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
    z = 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Metric(name, p, stderr, n, definition, round(max(0.0, centre - half), 12),
                  round(min(1.0, centre + half), 12))


def mean_metric(name: str, values: list[float], definition: str) -> Metric:
    n = len(values)
    mean = sum(values) / n
    stderr = (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None)
    return Metric(name, mean, stderr, n, definition)
