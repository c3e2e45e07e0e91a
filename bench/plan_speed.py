"""How long `qsweep plan` takes on a spec of ~100,000 cells, and that it imports no torch.

    python bench/plan_speed.py [--models 10] [--datasets 20]

Writes a spec (10 models x (baseline + 6 rtn variants x 7 bit widths x 12 group sizes) x 20
datasets = 101,000 cells) whose models are local folders holding only a config.json (preflight
reads configs, never weights), runs `qsweep plan` in a fresh process three times, and prints the
wall times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--datasets", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = []
        for i in range(args.models):
            folder = root / f"model-{i}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"hidden_size": 4096, "intermediate_size": 16384}))
            models.append({"name": f"model-{i}", "path": str(folder)})
        corpus = root / "corpus.txt"
        corpus.write_text("text\n")
        spec = {
            "name": "plan-bench", "models": models,
            "methods": [{"name": "baseline"},
                        {"name": "rtn", "sym": [True, False], "zero_point": ["int", "float"],
                         "group_fallback": ["ragged", "largest_divisor"]}],
            "bits": [2, 3, 4, 5, 6, 7, 8],
            "group_sizes": [-1, 2, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
            "datasets": [{"name": f"d{i}", "task": "perplexity", "path": str(corpus), "limit": 4}
                         for i in range(args.datasets)],
        }
        path = root / "big.yaml"
        path.write_text(yaml.safe_dump(spec))
        code = ("import sys, time; t = time.perf_counter(); from orchestrator.cli import main; "
                f"rc = main(['plan', {str(path)!r}, '--results', {str(root / 'results')!r}]); "
                "print(f'PLAN_SECONDS {time.perf_counter() - t:.2f}'); "
                "print('TORCH_IMPORTED', 'torch' in sys.modules); sys.exit(rc)")
        for attempt in range(3):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            wall = time.perf_counter() - start
            lines = out.stdout.splitlines()
            if out.returncode != 0:
                raise SystemExit(f"qsweep plan exited {out.returncode}:\n{out.stderr[-2000:]}")
            print(f"run {attempt + 1}: exit {out.returncode}, {lines[0]}")
            print(f"  in-process {next(line for line in lines if line.startswith('PLAN_SECONDS')).split()[1]} s, "
                  f"process wall {wall:.2f} s, {next(line for line in lines if line.startswith('TORCH'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
