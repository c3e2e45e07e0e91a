"""Run a spec's cells in this process (no Ray): the worker path a sweep's actors take."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def run_inline(spec: Any, state: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(cell, partial row) for every cell of ``spec``, group by group, on one WorkerState."""
    from orchestrator.cells import expand, group_cells
    from tasks.worker import run_group_rows

    for group in group_cells(expand(spec)):
        for cell_id, row in run_group_rows(group, state).items():
            yield next(c for c in group.cells if c.cell_id == cell_id), row
