"""The evaluation-task Protocol and its result. Torch-free."""

from __future__ import annotations

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


@dataclass
class EvalResult:
    primary: Metric
    metrics: list[Metric] = field(default_factory=list)


class EvalTask(Protocol):
    """An evaluation task: score ``model`` on the dataset entry; never raises on a bad score."""

    def evaluate(self, model: Any, tokenizer: Any, dataset: Any) -> EvalResult: ...
