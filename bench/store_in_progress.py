"""A sweep of many cells in progress against the same rows compacted: the driver's read of the
sweep's state (``make_plan``) and queries; prints figures and ratios, asserts nothing.

    python bench/store_in_progress.py [--cells 100000] [--every 1000] [--dir /tmp/qsweep-progress]

The in-progress layout is the one the driver leaves (issue 22.2): it compacts every ``--every``
rows, each compaction writing the new rows as a part, with the parts of a size class it merges
(``orchestrator.store.mergeable``), so the store holds those parts plus up to ``--every`` - 1 one-row
files written since the last compaction. The parts' row counts come from replaying that policy;
the rows are bench/analysis_1m.py's synthetic ones. Then, on fresh connections, the same reads
over that layout and over the sweep compacted whole (``qsweep compact --full``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.views import connect  # noqa: E402
from bench.analysis_1m import synthetic  # noqa: E402
from orchestrator.driver import COMPACT_EVERY_CELLS  # noqa: E402
from orchestrator.store import Store, mergeable  # noqa: E402

ROWS_PER_FILE = 250_000


def replay(cells: int, every: int) -> tuple[list[int], int]:
    """Row counts of the parts the driver's compactions leave with ``cells`` rows written, just
    before its next compaction (the worst moment: ``every`` - 1 one-row files), and that count."""
    loose = min(every - 1, cells)
    parts: list[int] = []
    done = 0
    while done < cells - loose:
        batch = min(every, cells - loose - done)
        folded = set(mergeable({str(i): n for i, n in enumerate(parts)}, ROWS_PER_FILE))
        merged = [n for i, n in enumerate(parts) if str(i) in folded]
        parts = [n for i, n in enumerate(parts) if str(i) not in folded] + [sum(merged) + batch]
        done += batch
    return parts, loose


def timed(label: str, fn) -> float:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {seconds:7.3f} s  -> {result}")
    return seconds


def measure(results: str) -> dict[str, float]:
    store = Store(results)
    figures = {
        "plan read": timed("make_plan's read (cell_id, status, ...)", lambda: store.read(
            "bench", columns=["cell_id", "status", "error_message", "attempts"]).num_rows),
    }
    for label, sql in (("scan", "select count(*), avg(primary_value) from cells"),
                       ("pareto", "select count(*) from pareto")):
        figures[label] = timed(label, lambda sql=sql: connect(results).execute(sql).fetchall()[0])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=COMPACT_EVERY_CELLS,
                        help=f"rows between the driver's compactions (default: the driver's, {COMPACT_EVERY_CELLS})")
    parser.add_argument("--dir", default="/tmp/qsweep-progress")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    table = synthetic(args.cells)
    parts, loose = replay(table.num_rows, args.every)
    (root / "bench" / "compacted").mkdir(parents=True)
    (root / "bench" / "cells").mkdir(parents=True)
    offset = 0
    for i, count in enumerate(parts):
        pq.write_table(table.slice(offset, count), root / "bench" / "compacted" / f"part-{i:05d}.parquet")
        offset += count
    for i in range(loose):
        pq.write_table(table.slice(offset + i, 1), root / "bench" / "cells" / f"{i:024x}.parquet")
    print(f"{table.num_rows:,} cells in progress: {len(parts)} parts ({', '.join(map(str, parts[:6]))}"
          f"{', ...' if len(parts) > 6 else ''}) and {loose} one-row files; {os.cpu_count()} CPUs")
    running = measure(str(root))
    Store(str(root)).compact("bench", full=True)
    print(f"compacted whole: {len(Store(str(root)).files('bench'))} file(s)")
    compacted = measure(str(root))
    print("in progress / compacted:")
    for key in running:
        print(f"  {key:<12} {running[key] / compacted[key]:5.2f}x  ({running[key]:.3f} s vs {compacted[key]:.3f} s)")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
