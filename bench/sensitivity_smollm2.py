"""Sensitivity study, allocation and its proof on SmolLM2-135M, on this machine's CPU.

```bash
python bench/sensitivity_smollm2.py --out /tmp/sens           # rtn: the 30-block study, timed
python bench/sensitivity_smollm2.py --out /tmp/sens --method gsq
```

Three texts, none seen twice: the study measures each unit's KL on ``select`` (docstrings of
Python's standard library, written by this script), calibrated methods calibrate on the
CPython documentation topics' train split, and the proof is measured on their held-out test
split (``heldout``). The spec holds the baseline, the uniform configurations (every layer at
one option) and the sensitivity block (every decoder block alone at each option, evaluated on
``select`` only). ``qsweep allocate`` then picks one option per block at the bits per weight of
the uniform ``--budget-option`` and the mixed spec it writes is run into the same store. The
script prints the study's wall time and per-cell times (the bench figure), and the held-out
comparison: bits per weight, weight bytes, KL and perplexity of each uniform configuration and
the mixed one. Weights are SmolLM2's dequantized Q4_1 GGUF: a 4-bit option sits near that grid
(rtn's integer zero point is not Q4_1's float offset, so it is close, not exact).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "rtn": ({"name": "rtn", "sym": False, "zero_point": "int"},
            [(2, 32), (3, 32), (4, 32)], (3, 32)),
    # a budget between 3 and 4 bits: gsq w3 g32's bits per weight, from w3 g128, w3 g32 and w4 g128
    "gsq": ({"name": "gsq", "sym": False, "zero_point": "int", "alpha_grid": 5},
            [(3, 128), (3, 32), (4, 128)], (3, 32)),
}
STDLIB = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
          "difflib", "email", "enum", "fractions", "functools", "heapq", "html", "http", "inspect", "io",
          "itertools", "json", "logging", "mailbox", "math", "operator", "os", "pathlib", "pickle",
          "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
          "tarfile", "textwrap", "threading", "typing", "unittest", "urllib", "uuid", "zipfile")


def select_text(path: Path) -> Path:
    """Docstrings of standard-library modules and their public members: text unlike the
    documentation topics the proof is measured on."""
    import importlib
    import inspect

    parts = []
    for name in STDLIB:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for member in sorted(vars(module)):
            obj = getattr(module, member)
            if not member.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                parts.append(inspect.getdoc(obj) or "")
    path.write_text("\n\n".join(p for p in parts if p))
    return path


def study_spec(method: str, select: Path) -> dict:
    entry, options, _ = METHODS[method]
    datasets = [{"name": "select", "task": "perplexity", "path": str(select), "limit": 8, "seq_len": 512,
                 "batch_size": 4},
                {"name": "heldout", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": 8,
                 "seq_len": 512, "batch_size": 4}]
    uniform = [{**entry, "bits": [bits], "group_sizes": [group]} for bits, group in options]
    spec = {"name": f"sens-{method}", "models": [{"name": "smollm2-135m", "dtype": "float32"}],
            "methods": [{"name": "baseline"}, *uniform], "datasets": datasets,
            "sensitivity": {"unit": "block", "method": entry, "datasets": ["select"],
                            "options": [{"bits": b, "group_size": g} for b, g in options]},
            # speed is not what this study measures: the least profiling a row allows
            "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}}
    if method != "rtn":
        spec["calibration"] = {"dataset": "pydoc-topics", "samples": 16, "seq_len": 512}
    return spec


def qsweep(*args: str) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"qsweep {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(out.stdout.strip().splitlines()[-1] if args[0] == "run" else out.stdout.rstrip())
    return time.perf_counter() - start


def query(results: Path, sql: str) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from analysis.views import connect

    relation = connect(str(results)).execute(sql)
    names = [d[0] for d in relation.description]
    return [dict(zip(names, row)) for row in relation.fetchall()]


def plot(rows: list[dict], method: str, path: Path) -> None:
    """Held-out perplexity and KL against bits per weight: the uniform configs and the mixed one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "perplexity", "held-out perplexity (log)"), (axes[1], "kl_divergence", "KL vs baseline (log)")):
        uniform = [r for r in rows if not r["sweep"].startswith("mixed")]
        mixed = [r for r in rows if r["sweep"].startswith("mixed")]
        ax.plot([r["bits_per_weight"] for r in uniform], [r[key] for r in uniform], "o-", label=f"uniform {method}")
        for r in uniform:
            ax.annotate(f"w{r['bits']} g{r['group_size']}", (r["bits_per_weight"], r[key]), fontsize=8)
        ax.plot([r["bits_per_weight"] for r in mixed], [r[key] for r in mixed], "r*", markersize=12,
                label="mixed (qsweep allocate)")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (quantized layers, scales and zeros included)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {method}: per-block allocation at the budget of uniform w3 g32", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the specs and the store")
    parser.add_argument("--method", choices=sorted(METHODS), default="rtn")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results"
    spec = study_spec(args.method, select_text(out / "select.txt"))
    spec_path = out / f"sens-{args.method}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    wall = qsweep("run", str(spec_path), "--results", str(results), "--no-progress")
    units = query(results, f"""select count(*) as cells, sum(time_quantize_s) as quantize_s,
        sum(time_evaluate_s) as evaluate_s, sum(time_profile_s) as profile_s, sum(time_load_s) as load_s
        from cells c semi join sensitivity s on s.cell_id = c.cell_id where c.sweep = '{spec["name"]}'""")[0]
    print(f"study: {spec['name']}: {units['cells']} unit cells (30 blocks x {len(METHODS[args.method][1])} "
          f"options), whole spec in {wall:.0f} s wall on {os.cpu_count()} CPUs; unit cells: quantize "
          f"{units['quantize_s']:.0f} s, evaluate {units['evaluate_s']:.0f} s, profile {units['profile_s']:.0f} s "
          f"(sums over cells), {wall / max(units['cells'], 1):.1f} s per unit cell of wall")
    bits, group = METHODS[args.method][2]
    budget = query(results, f"""select bits_per_weight from cells where sweep = '{spec["name"]}'
        and method = '{args.method}' and bits = {bits} and group_size = {group} and method_params not like '%overrides%'
        and status = 'ok' limit 1""")[0]["bits_per_weight"]
    mixed = out / f"mixed-{args.method}.yaml"
    qsweep("allocate", "--results", str(results), "--sweep", spec["name"], "--dataset", "select",
           "--bits-per-weight", repr(budget), "--out", str(mixed), "--name", f"mixed-{args.method}")
    qsweep("run", str(mixed), "--results", str(results), "--no-progress")
    rows = query(results, f"""select sweep, config, bits, group_size, bits_per_weight, weight_bytes, dataset,
               kl_divergence, predicted_kl, value as perplexity, baseline_value
        from baseline_deltas where is_primary and dataset = 'heldout' and method = '{args.method}'
        order by bits_per_weight, sweep""")
    print(f"\nheld-out (pydoc-topics test split, 8 x 512 tokens); budget: w{bits} g{group}'s {budget:.4f} bits per weight")
    print(f"{'config':<34} {'bpw':>7} {'weight bytes':>13} {'KL':>9} {'pred. KL':>9} {'ppl':>8}")
    for r in rows:
        label = "mixed (allocated)" if r["sweep"].startswith("mixed") else f"uniform w{r['bits']} g{r['group_size']}"
        predicted = f"{r['predicted_kl']:.5f}" if r["predicted_kl"] is not None else "-"
        print(f"{label:<34} {r['bits_per_weight']:7.4f} {r['weight_bytes']:13,d} {r['kl_divergence']:9.5f} "
              f"{predicted:>9} {r['perplexity']:8.3f}")
    print(f"baseline perplexity {rows[0]['baseline_value']:.3f}")
    for r in query(results, f"""select kl_divergence, predicted_kl from baseline_deltas where is_primary
                                and dataset = 'select' and sweep = 'mixed-{args.method}'"""):
        print(f"on the study's own text (select): mixed KL {r['kl_divergence']:.5f} measured, "
              f"{r['predicted_kl']:.5f} predicted (sum of the blocks' KL alone)")
    plot(rows, args.method, out / f"pareto-{args.method}.png")
    (out / f"summary-{args.method}.json").write_text(json.dumps({"method": args.method, "wall_s": wall, "units": units, "budget": budget,
                                                                 "heldout": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
