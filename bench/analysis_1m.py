"""Speed of the analysis views against a full scan, at growing store sizes; prints figures,
asserts nothing.

    python bench/analysis_1m.py [--rows 10000,100000,1000000] [--repeats 3] [--dir /tmp/qsweep-bench] [--keep]

For each size, writes a compacted store (``<dir>/bench/compacted/part-*.parquet``, 250k rows a file, the
layout ``qsweep compact`` leaves) of ``rows`` ok cells: 100 models x 10 datasets, each
(model, dataset) with its baseline and quantized configs over methods, bits 2-8, group sizes
and seeds. Weight bytes follow from (model, bits, group size); quality falls with fewer bits
plus noise; latency is noisy. Every row has one metric (so baseline_deltas and table1 have
work to do) and no per-example records (no paired tests). Then times the full scan
``select count(*), avg(primary_value) from cells`` and each named query (pareto, deltas, table1;
qsweep query's SQL) and recommend's search, two ways:

- cold: a fresh connection each run, then the query (what ``qsweep query NAME`` and ``qsweep
  recommend`` do). A connection lists the store, finds the cells written more than once and
  the baselines (analysis.views.connect), so the scan it is divided by includes that one read.
- warm: every query on one connection, after that work is done. The warm scan is a bare
  two-column read, so warm ratios show how much each view adds to reading the rows.

Each figure is the best of ``--repeats`` runs (wall clock, and this process's CPU time, which
a busy shared machine disturbs less) with its ratio to the scan of the same store in the same
run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.named import NAMED_QUERIES
from analysis.recommend import Budget, recommend
from analysis.views import connect
from orchestrator.schema import METRIC, SCHEMA

SCAN = "select count(*), avg(primary_value) from cells"

MODELS, DATASETS = 100, 10
METHODS = ("rtn", "gptq", "gsq", "awq")
GROUPS = (16, 32, 64, 128, -1)


def synthetic(rows: int, seed: int = 0, models: int = MODELS, datasets: int = DATASETS) -> pa.Table:
    """``rows`` ok cells (rounded down to whole (model, dataset) groups) over ``models`` x
    ``datasets``, as one table of the row schema."""
    rng = np.random.default_rng(seed)
    per_group = rows // (models * datasets)
    n = per_group * models * datasets
    index = np.arange(n)
    group = index // per_group
    position = index % per_group  # 0 = the baseline of its (model, dataset)
    model = group // datasets
    dataset = group % datasets
    baseline = position == 0
    method = np.where(baseline, "baseline", np.array(METHODS)[position % len(METHODS)])
    bits = np.where(baseline, 0, 2 + (position // len(METHODS)) % 7)
    group_size = np.where(baseline, 0, np.array(GROUPS)[(position // 28) % len(GROUPS)])
    params = 1e8 * (1 + model % 10)
    scale_bits = np.where(group_size > 0, 32 / np.maximum(group_size, 1), 32 / 4096)
    weight_bytes = np.where(baseline, params * 2, params * (bits + scale_bits) / 8).astype(np.int64)
    higher = dataset % 2 == 0  # even datasets: accuracy; odd: perplexity
    base_score = np.where(higher, 0.5 + 0.04 * (model % 10), 8 + model % 7)
    damage = np.where(baseline, 0, 2.0 ** (4 - bits)) * rng.uniform(0.01, 0.05, n)
    value = np.where(higher, base_score - damage, base_score * (1 + damage))
    latency = np.where(baseline, 30.0, 12 + bits) * rng.uniform(0.9, 1.3, n) * (1 + model % 10) / 5
    names = np.where(higher, "acc", "token_perplexity")
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    metrics = pa.array([[{"metric": m, "value": float(v), "stderr": 0.01, "n": 1000}]
                        for m, v in zip(names.tolist(), value.tolist())], type=pa.list_(METRIC))
    columns = {
        "schema_version": pa.array(np.ones(n, dtype=np.int64)),
        "sweep": pa.array(["bench"] * n),
        "cell_id": pa.array([f"{i:024x}" for i in range(n)]),
        "model": pa.array([f"model-{m:03d}" for m in model.tolist()]),
        "dtype": pa.array(["bfloat16"] * n),
        "method": pa.array(method.tolist()),
        "method_params": pa.array([f'{{"seed": {p % 3}}}' if not b else "{}"
                                   for p, b in zip(position.tolist(), baseline.tolist())]),
        "bits": pa.array(bits, mask=baseline),
        "group_size": pa.array(group_size, mask=baseline),
        "dataset": pa.array([f"dataset-{d}" for d in dataset.tolist()]),
        "eval_settings": pa.array(["{}"] * n),
        "status": pa.array(["ok"] * n),
        "primary_metric": pa.array(names.tolist()),
        "primary_value": pa.array(value),
        "primary_stderr": pa.array(np.full(n, 0.01)),
        "metrics": metrics,
        "weight_bytes": pa.array(weight_bytes),
        "bits_per_weight": pa.array(bits + scale_bits, mask=baseline),
        "kernel": pa.array(np.where(baseline, "dense", "marlin").tolist()),
        "tpot_p50_ms": pa.array(latency),
        "finished_at": pa.array([at] * n, type=pa.timestamp("us", tz="UTC")),
    }
    return pa.table([columns.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA], schema=SCHEMA)


def write_store(root: Path, rows: int) -> tuple[str, str]:
    """The compacted store of ``rows`` synthetic cells under ``root``; returns (results, summary)."""
    parts = root / "bench" / "compacted"
    parts.mkdir(parents=True)
    start = time.perf_counter()
    table = synthetic(rows)
    for i, offset in enumerate(range(0, table.num_rows, 250_000)):
        pq.write_table(table.slice(offset, 250_000), parts / f"part-{i:04d}.parquet")
    size = sum(f.stat().st_size for f in parts.iterdir())
    return str(root), (f"{table.num_rows:,} rows, {len(list(parts.iterdir()))} files, {size / 1e6:.1f} MB, "
                       f"written in {time.perf_counter() - start:.1f} s")


def queries() -> dict[str, Callable[[object], int]]:
    """Each measured query, run to the end on a connection; returns its row count. SQL results
    come back as Arrow (what `qsweep query --format parquet` does), not as Python tuples, so
    that a query returning a million rows is timed as a query, not as a million tuple
    allocations."""
    def sql(text: str) -> Callable[[object], int]:
        return lambda con: con.sql(text).to_arrow_table().num_rows

    def search(con) -> int:
        answer = recommend(con, "dataset-2", Budget(max_drop=0.02, max_weight_bytes=300_000_000))
        return len(answer.picks)

    return {
        "scan": sql(SCAN),
        "pareto": sql(NAMED_QUERIES["pareto"][1]),
        "pareto (one front)": sql("select * from pareto where model = 'model-007' and dataset = 'dataset-3'"),
        "deltas": sql(NAMED_QUERIES["deltas"][1]),
        "table1": sql(NAMED_QUERIES["table1"][1]),
        "recommend": search,
    }


def timed(run: Callable[[], int]) -> tuple[float, float, int]:
    wall, cpu = time.perf_counter(), time.process_time()
    rows = run()
    return time.perf_counter() - wall, time.process_time() - cpu, rows


def measure(results: str, repeats: int) -> dict[str, dict[str, tuple[float, float, int]]]:
    """mode (cold | warm) -> query -> (best wall seconds, best CPU seconds of this process,
    rows); each query runs ``repeats`` times, interleaved with the others."""
    runs = queries()
    best: dict[str, dict[str, tuple[float, float, int]]] = {"cold": {}, "warm": {}}

    def keep(mode: str, name: str, figures: tuple[float, float, int]) -> None:
        old = best[mode].get(name, (math.inf, math.inf, figures[2]))
        best[mode][name] = (min(old[0], figures[0]), min(old[1], figures[1]), figures[2])

    def cold(run: Callable[[object], int]) -> int:
        con = connect(results)
        try:
            return run(con)
        finally:
            con.close()

    warm = connect(results)
    for _ in range(repeats):
        for name, run in runs.items():
            keep("cold", name, timed(lambda run=run: cold(run)))
            keep("warm", name, timed(lambda run=run: run(warm)))
    warm.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000",
                        help="comma-separated store sizes, each measured in this run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each query; the best counts")
    parser.add_argument("--dir", default="/tmp/qsweep-bench")
    parser.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    args = parser.parse_args()
    sizes = [int(n.replace("_", "")) for n in args.rows.split(",")]
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; best of {args.repeats}; "
          f"ratio = query / the full scan ({SCAN}) of the same store in the same run")
    table: dict[str, dict[str, dict[int, tuple[float, float, int]]]] = {"cold": {}, "warm": {}}
    for rows in sizes:
        results, summary = write_store(root / str(rows), rows)
        connected = time.perf_counter()
        connect(results).close()
        print(f"store {summary}; connect {time.perf_counter() - connected:.2f} s")
        for mode, figures in measure(results, args.repeats).items():
            for name, (wall, cpu, count) in figures.items():
                table[mode].setdefault(name, {})[rows] = (wall, cpu, count)
        if not args.keep:
            shutil.rmtree(root / str(rows))
    header = "".join(f"{f'{n:,} rows':>34}" for n in sizes)
    for mode, title in (("cold", "cold: a fresh connection + the query (qsweep query / recommend)"),
                        ("warm", "warm: one connection, the store's listing and repeated cells already found")):
        print(f"\n{title}\n{'query':<20}{header}")
        print(f"{'':<20}" + "".join(f"{'wall s (x scan)  cpu s (x scan)':>34}" for _ in sizes))
        for name, by_size in table[mode].items():
            cells = []
            for rows in sizes:
                wall, cpu, _ = by_size[rows]
                scan_wall, scan_cpu, _ = table[mode]["scan"][rows]
                cells.append(f"{wall:8.3f} ({wall / scan_wall:5.2f}x) {cpu:7.3f} ({cpu / scan_cpu:5.2f}x)")
            print(f"{name:<20}" + "".join(f"{c:>34}" for c in cells))
    print(f"\n{'rows returned':<20}" + "".join(f"{'':>34}" for _ in sizes))
    for name, by_size in table["warm"].items():
        print(f"  {name:<18}" + "".join(f"{by_size[n][2]:>34,}" for n in sizes))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
