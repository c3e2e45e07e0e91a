"""The spec's ``profile:`` block: what every latency, throughput and memory figure is measured at.

```yaml
profile: {prompt_len: 64, gen_len: 16, batch_sizes: [1, 8], repeats: 3, warmup: 1}
```

The settings are part of the measurement, not of the cell: they are recorded in each row
(``profile_*`` columns) and never hashed into ``cell_id``. Torch-free.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

PositiveInt = Annotated[int, Field(strict=True, gt=0)]


class ProfileConfig(BaseModel):
    """Profile settings; the defaults are small enough for a 135M model on a laptop CPU.

    - ``prompt_len``: prompt tokens per sequence, the first tokens of the cell's dataset.
    - ``gen_len``: new tokens per sequence, always exactly this many (greedy, no stop at EOS);
      at least 2, so that there is a decode step after the first token.
    - ``batch_sizes``: batch sizes for throughput; batch size 1 is always measured too
      (latency is defined at batch size 1).
    - ``repeats``: timed runs per batch size; figures are their median, with min and max.
    - ``warmup``: untimed runs before the timed ones, at each batch size.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    ALLOWED: ClassVar[dict[str, str]] = {
        "prompt_len": "a positive integer (tokens)",
        "gen_len": "an integer >= 2 (tokens)",
        "batch_sizes": "a non-empty list of distinct positive integers, e.g. [1, 8]",
        "repeats": "a positive integer",
        "warmup": "an integer >= 0",
    }

    prompt_len: PositiveInt = 64
    gen_len: Annotated[int, Field(strict=True, ge=2)] = 16
    batch_sizes: tuple[PositiveInt, ...] = (1, 8)
    repeats: PositiveInt = 3
    warmup: Annotated[int, Field(strict=True, ge=0)] = 1

    @field_validator("batch_sizes")
    @classmethod
    def _distinct_and_non_empty(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("give at least one batch size, e.g. [1, 8]")
        if len(set(value)) != len(value):
            raise ValueError("batch sizes must be distinct")
        return value

    def measured_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes profiled, ascending (so memory is measured small to large): 1 included."""
        return tuple(sorted({1, *self.batch_sizes}))
