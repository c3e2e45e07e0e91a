"""Profile SmolLM2-135M on a GPU in one call: the baseline and a 4-bit group-64 RTN cell.

Runs the real cell pipeline (``tasks.worker.run_group``: load → quantize → evaluate → profile),
inline, without Ray, and prints the GPU, the driver and every profile figure of the two rows:
latency (TTFT, per-output-token p50 / p95), throughput at each batch size, and peak memory of
each kind (torch allocated / reserved, NVML process, RSS), with the kernel path each one ran.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python bench/profile_gpu.py
    python bench/profile_gpu.py --device cpu --prompt-len 16 --gen-len 8 --batch-sizes 1 4   # a CPU smoke run

The RTN cell is held dequantized (``kernel = dequantized``): its speed is that of dense matmuls,
not a claim about a packed 4-bit kernel. The GPU test of the profiler itself:
``python -m pytest -m gpu tests/test_profile.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # before CUDA starts: NVML and torch agree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    args = parser.parse_args(argv)

    import torch

    from orchestrator.cells import expand, group_cells
    from orchestrator.spec import parse_spec
    from tasks.worker import WorkerState, run_group_rows

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible (torch.cuda.is_available() is False); use --device cpu for a smoke run")
        return 2
    dtype = args.dtype if args.device == "cuda" else "float32"
    spec = parse_spec({
        "name": "profile-gpu", "models": [{"name": "smollm2-135m", "dtype": dtype}],
        "methods": [{"name": "baseline"}, {"name": "rtn", "sym": True}], "bits": [4], "group_sizes": [64],
        "datasets": [{"name": "pydoc-topics", "task": "perplexity", "limit": 4, "seq_len": 512}],
        "profile": {"prompt_len": args.prompt_len, "gen_len": args.gen_len,
                    "batch_sizes": args.batch_sizes, "repeats": args.repeats, "warmup": args.warmup},
    }, source="bench/profile_gpu.py")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, CUDA_DEVICE_ORDER="
          f"{os.environ.get('CUDA_DEVICE_ORDER')}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, driver {_driver_version()}")
    state = WorkerState(device=args.device)
    for group in group_cells(expand(spec)):
        for row in run_group_rows(group, state).values():
            _print_row(row, group.head.method)
    return 0


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unknown ({exc})"


def _mib(value: float | None) -> str:
    return "null" if value is None else f"{value / 2**20:.1f} MiB"


def _print_row(row: dict, method: str) -> None:
    print(f"\n== {method}: status {row['status']}")
    if row["status"] != "ok":
        print(f"   {row.get('error_stage')}: {row.get('error_message')}")
        if row.get("ttft_ms") is None:
            return
    print(f"   device {row['profile_device']}, backend {row['profile_backend']}, weight_format "
          f"{row['weight_format']}, kernel {row['kernel']}")
    print(f"   token perplexity {row['primary_value']:.3f}; weights {_mib(row['weight_bytes'])} "
          f"({row['weight_bytes_source']}), bits/weight {row['bits_per_weight']}")
    print(f"   prompt {row['profile_prompt_len']} tokens, {row['profile_gen_len']} new tokens, "
          f"{row['profile_warmup']} warm-up, median of {row['profile_repeats']} runs [min, max]")
    for name in ("ttft_ms", "tpot_p50_ms", "tpot_p95_ms", "throughput_tok_s"):
        print(f"   {name:<18} {row[name]:10.2f}  [{row[name + '_min']:.2f}, {row[name + '_max']:.2f}]")
    metrics = {m["metric"]: m["value"] for m in row["metrics"]}
    for batch in row["profile_batch_sizes"]:
        kinds = ", ".join(f"{kind} {_mib(metrics.get(f'gen_{kind}@bs{batch}'))}" for kind in
                          ("cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes",
                           "nvml_peak_process_bytes", "peak_rss_bytes", "kv_cache_bytes"))
        print(f"   bs {batch:>3}: {metrics[f'throughput_tok_s@bs{batch}']:10.1f} tok/s  "
              f"[{metrics[f'throughput_tok_s_min@bs{batch}']:.1f}, {metrics[f'throughput_tok_s_max@bs{batch}']:.1f}]; {kinds}")
    print(f"   evaluation peaks: rss {_mib(row['peak_rss_bytes'])}, cuda allocated "
          f"{_mib(row['cuda_peak_allocated_bytes'])}, reserved {_mib(row['cuda_peak_reserved_bytes'])}, "
          f"nvml process {_mib(row['nvml_peak_process_bytes'])}")


if __name__ == "__main__":
    raise SystemExit(main())
