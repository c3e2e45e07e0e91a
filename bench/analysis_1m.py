"""Speed of the analysis views on a large synthetic store; prints figures, asserts nothing.

    python bench/analysis_1m.py [--rows 1000000] [--dir /tmp/qsweep-bench] [--keep]

Writes a compacted store (``<dir>/bench/compacted/part-*.parquet``, 250k rows a file, the
layout ``qsweep compact`` leaves) of ``rows`` ok cells: 100 models x 10 datasets, each
(model, dataset) with its baseline and quantized configs over methods, bits 2-8, group sizes
and seeds. Weight bytes follow from (model, bits, group size); quality falls with fewer bits
plus noise; latency is noisy. Every row has one metric (so baseline_deltas and table1 have
work to do) and no per-example records (no paired tests). Then times, on a fresh connection
each: connecting, counting cells, the Pareto front, table1 and a recommend-style filter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.views import connect
from orchestrator.schema import METRIC, SCHEMA

MODELS, DATASETS = 100, 10
METHODS = ("rtn", "gptq", "gsq", "awq")
GROUPS = (16, 32, 64, 128, -1)


def synthetic(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    per_group = rows // (MODELS * DATASETS)
    n = per_group * MODELS * DATASETS
    index = np.arange(n)
    group = index // per_group
    position = index % per_group  # 0 = the baseline of its (model, dataset)
    model = group // DATASETS
    dataset = group % DATASETS
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


def timed(label: str, results: str, sql: str) -> None:
    start = time.perf_counter()
    con = connect(results)
    connected = time.perf_counter()
    rows = con.execute(sql).fetchall()
    done = time.perf_counter()
    print(f"{label:<34} {done - connected:7.2f} s  (connect {connected - start:.2f} s)  -> {len(rows):,} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", default="/tmp/qsweep-bench")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    parts = root / "bench" / "compacted"
    parts.mkdir(parents=True)
    start = time.perf_counter()
    table = synthetic(args.rows)
    for i, offset in enumerate(range(0, table.num_rows, 250_000)):
        pq.write_table(table.slice(offset, 250_000), parts / f"part-{i:04d}.parquet")
    size = sum(f.stat().st_size for f in parts.iterdir())
    print(f"store: {table.num_rows:,} rows, {len(list(parts.iterdir()))} files, {size / 1e6:.1f} MB, "
          f"written in {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs")
    results = str(root)
    timed("select count(*) from cells", results, "select count(*) from cells")
    timed("pareto (every front)", results, "select * from pareto")
    timed("pareto (one model, one dataset)", results,
          "select * from pareto where model = 'model-007' and dataset = 'dataset-3'")
    timed("table1", results, "select * from table1")
    timed("recommend-style filter", results,
          "select config, value, weight_bytes from baseline_deltas where dataset = 'dataset-2' "
          "and quality_drop <= 0.02 and weight_bytes <= 3e8 order by weight_bytes limit 5")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
