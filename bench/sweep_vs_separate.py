"""A group-size sweep run as one sweep, and as one single-cell sweep per cell: the cost of
orchestration and of not sharing work.

    python bench/sweep_vs_separate.py [--methods rtn gsq] [--group-sizes 32 64 128 -1]
                                      [--out /tmp/qsweep-bench-sweep]

Both run in this process tree, one after the other, on SmolLM2-135M (CPU unless CUDA is
there): the methods (default rtn; gsq calibrates on 16 windows of 256 tokens of the CPython
docs' train topics) at 4 bits, G group sizes x D=2 datasets (token perplexity on the CPython
docs' test topics and the WikiText fixture). Prints both wall times and their ratio (target: the
sweep costs at most half), and, from the sweep's rows, orchestration overhead against cell
compute (target: at most 2%). GPTQ through qsweep vs GPTQModel directly:
bench/gptq_wrapper_vs_direct.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATASETS = [{"name": "pydoc-topics", "task": "perplexity", "limit": 6, "seq_len": 256},
            {"name": "wikitext-fixture", "limit": 4, "seq_len": 256, "word_limit": 4}]
PROFILE = {"prompt_len": 16, "gen_len": 4, "batch_sizes": [1], "repeats": 1, "warmup": 0}


CALIBRATION = {"dataset": "pydoc-topics", "samples": 16, "seq_len": 256}


def spec(name: str, methods: list[str], group_sizes: list[int], datasets: list[dict]) -> dict:
    return {"name": name, "models": [{"name": "smollm2-135m"}],
            "methods": [{"name": m, "sym": False} for m in methods], "bits": [4], "group_sizes": group_sizes,
            "datasets": datasets, "profile": PROFILE, "calibration": CALIBRATION}


def run(spec_data: dict, folder: Path) -> float:
    path = folder / f"{spec_data['name']}.yaml"
    path.write_text(yaml.safe_dump(spec_data))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results",
                           str(folder / "results"), "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{path}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["rtn"], choices=["rtn", "gsq"])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128, -1])
    parser.add_argument("--out", type=Path, default=Path("/tmp/qsweep-bench-sweep"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "sweep").mkdir(parents=True)
    cells = len(args.methods) * len(args.group_sizes) * len(DATASETS)

    sweep_wall = run(spec("bench-sweep", args.methods, args.group_sizes, DATASETS), args.out / "sweep")
    print(f"one sweep, {cells} cells: {sweep_wall:.1f} s", flush=True)

    separate_wall = 0.0
    for method in args.methods:
        for g in args.group_sizes:
            for d in DATASETS:
                folder = args.out / f"single-{method}-{g}-{d['name']}"
                folder.mkdir()
                wall = run(spec("bench-single", [method], [g], [d]), folder)
                separate_wall += wall
                print(f"  single cell {method} g={g} {d['name']}: {wall:.1f} s", flush=True)
    print(f"{cells} single-cell sweeps: {separate_wall:.1f} s")
    print(f"ratio sweep / separate: {sweep_wall / separate_wall:.2f} (target <= 0.5)")

    sys.path.insert(0, str(ROOT))
    from analysis.views import connect

    con = connect(str(args.out / "sweep" / "results"))
    overhead, evaluate, profile, cells_ok = con.execute(
        "select coalesce(sum(time_overhead_s), 0), coalesce(sum(time_evaluate_s), 0), "
        "coalesce(sum(time_profile_s), 0), count(*) from cells where status = 'ok'").fetchone()
    groups = con.execute("select coalesce(sum(t), 0) from (select any_value(time_load_s + time_quantize_s) "
                         "as t from cells group by group_id)").fetchone()[0]
    if cells_ok == 0:
        print("the sweep's store has no ok rows: nothing to attribute")
        return 1
    compute = groups + evaluate + profile
    print(f"sweep rows ok: {cells_ok}; cell compute {compute:.1f} s (load+quantize {groups:.1f}, "
          f"evaluate {evaluate:.1f}, profile {profile:.1f}); orchestration overhead {overhead:.2f} s "
          f"= {100 * overhead / compute:.2f}% (target <= 2%)")
    print(f"sweep wall not spent in cells: {sweep_wall - compute:.1f} s (process start, Ray start, "
          f"actor start, imports, compaction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
