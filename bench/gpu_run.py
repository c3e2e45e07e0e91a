"""Issue 23 in one call on a GPU machine: packed kernels, CUDA memory, decode speed against the
bandwidth limit. Prints a report and writes it, with a JSON of every figure, to ``$OUT`` (or
``--out DIR``).

    python bench/gpu_run.py                                   # on the GPU (8 minutes at most)
    python bench/gpu_run.py --phases memory --budget-s 200     # a rerun of one phase
    python bench/gpu_run.py --device cpu --out /tmp/smoke      # CPU smoke run: same code, tiny sizes

What it runs (each phase in its own process, under a deadline, in this order; a phase that fails
or runs out of time is reported with its reason and the others still run):

1. ``env``: versions, the GPU's name, driver, datasheet HBM bandwidth (stated with its source)
   and a measured device-to-device copy bandwidth. ``prebuild`` then starts in the background:
   GPTQModel's JIT CUDA kernels (Marlin bf16, ExLlama v2), so that no phase waits for nvcc
   longer than it must.
2. ``decode`` (issue item 2): Llama-3.2-1B- and Llama-3.1-8B-shaped models, random weights
   saved locally, loaded by ``tasks.models.load_model``; ``tasks.profile.speed.profile_speed``
   in bfloat16, then after the registry's ``int4`` method (torchao tinygemm, group 64) at batch
   1, 8 and 32: TTFT, step p50/p95, tokens/s, every memory kind, weight bytes read per step and
   the fraction of the bandwidth limit it reached; a CUDA-graph replay of one step shows the
   launch overhead the eager loop pays. The 8B int4/bf16 batch-1 ratio is held against 1.5x.
3. ``sweep`` (item 1): the demo-style sweep (baseline, rtn, GPTQ and AWQ through GPTQModel with
   ``BACKEND.AUTO``, torchao int4 / int8 / fp8, bitsandbytes NF4) on a SmolLM2-shaped model
   (random init, trained a few hundred steps on the GPU so its logits mean something: SmolLM2's
   GGUF is over the carry limit), through ``tasks.worker.run_group_rows``; ``kernel`` in every
   row names what ran.
4. ``reference``: the same cells on the CPU (the machine's own cores); perplexities compared
   with the GPU rows within ``TOLERANCE`` (2% relative for data-free methods, 5% for calibrated
   ones, whose quantization itself runs on each device).
5. ``memory`` (item 3): one GPTQ group of the 1B-shaped model, stage by stage as the worker
   runs it, torch allocated / reserved, NVML process memory and RSS against
   ``orchestrator.preflight.memory_plan``; then the packed model's decode with the kernel
   GPTQModel picked.

With ``--device cpu`` every phase runs at tiny sizes on the CPU (both sweep runs on the CPU:
the comparison then exercises the code only), and everything that needs CUDA is skipped with
its reason. ``tests/test_gpu_run.py`` runs that mode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_phases import TOLERANCE, phase_path, read_phase

# phase -> (seconds it may take at most, seconds kept for it while earlier phases run)
BUDGET_CUDA = {"env": (40, 15), "decode": (180, 60), "sweep": (130, 45), "reference": (100, 40),
               "memory": (100, 40)}
BUDGET_CPU = {"env": (60, 10), "decode": (120, 15), "sweep": (120, 20), "reference": (120, 20),
              "memory": (120, 15)}
ORDER = ("env", "decode", "sweep", "reference", "memory")
MiB = 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "gpu-run"))
    parser.add_argument("--work", default=None, help="models, scratch and phase files (default: a temp folder)")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run (default 480 on cuda, 300 on cpu)")
    parser.add_argument("--phases", default=",".join(ORDER),
                        help=f"comma-separated subset of {','.join(ORDER)} (a rerun of what failed; env always runs)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    work = Path(args.work or "/tmp/qsweep-gpu-run")  # models and phase files: a rerun reuses them
    if args.phase:
        from gpu_phases import run_phase

        return run_phase(args.phase, cuda, work)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (480.0 if cuda else 300.0)
    wanted = {"env", *filter(None, args.phases.split(","))}
    unknown = wanted - set(ORDER)
    if unknown:
        parser.error(f"--phases: unknown {', '.join(sorted(unknown))}; known: {', '.join(ORDER)}")
    order = tuple(name for name in ORDER if name in wanted)
    deadline = time.monotonic() + budget
    env = phase_env_vars(cuda, work)
    log_path = out / "phases.log"
    log_path.write_text("")
    for name in (*order, "prebuild"):  # this run's phases start afresh; others' figures are kept
        phase_path(work, name).unlink(missing_ok=True)
    results: dict[str, Any] = {"issue": 23, "device": args.device, "mode": "gpu" if cuda else "cpu-smoke",
                               "budget_s": budget, "work": str(work), "tolerance": TOLERANCE,
                               "phases_run": list(order), "phases": {}}
    budgets = BUDGET_CUDA if cuda else BUDGET_CPU
    prebuild = None
    for index, name in enumerate(order):
        if name in ("sweep", "memory") and prebuild is not None:  # they load GPTQ checkpoints with AUTO
            wait_for(prebuild, min(60.0, deadline - time.monotonic() - reserve(budgets, order[index:])))
        limit = min(budgets[name][0], deadline - time.monotonic() - reserve(budgets, order[index + 1:]))
        if name != "env" and results["phases"]["env"]["status"] != "ok":
            results["phases"][name] = {"status": "skipped", "reason": "the env phase failed: "
                                       f"{results['phases']['env'].get('reason')}"}
            continue
        results["phases"][name] = run_child(name, cuda, work, env, limit, log_path)
        if name == "env" and results["phases"]["env"]["status"] == "ok":
            env = phase_env_vars(cuda, work, read_phase(work, "env"))
            if {"sweep", "memory"} & wanted:
                prebuild = start_prebuild(cuda, work, env, out / "prebuild.log", results)
        finish(results, work, out, prebuild)
    if prebuild is not None and prebuild.poll() is None:
        stop(prebuild)
    finish(results, work, out, prebuild)
    trim(log_path)
    trim(out / "prebuild.log")
    text = (out / "report.txt").read_text()
    print(text)
    return 0


def reserve(budgets: dict[str, tuple[int, int]], later: tuple[str, ...]) -> float:
    return float(sum(budgets[name][1] for name in later))


def phase_env_vars(cuda: bool, work: Path, env_phase: dict | None = None) -> dict[str, str]:
    """The environment every phase runs in: offline, one GPU in PCI order (NVML and torch agree),
    GPTQModel's kernels built for this GPU only into a folder every phase shares."""
    env = dict(os.environ)
    env.update({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "GPTQMODEL_OFFLINE": "1",  # Machete would download CUTLASS: nothing can be fetched there
                "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "QSWEEP_SCRATCH": str(work / "scratch"), "QSWEEP_CACHE": str(work / "cache"),
                "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(work / "torch-ext"),
                "TORCH_EXTENSIONS_DIR": str(work / "torch-ext"),
                "MAX_JOBS": env.get("MAX_JOBS", "8"),  # half the H200 machine's cores: the decode phase runs beside
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))})
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0") if cuda else ""
    (work / "scratch").mkdir(parents=True, exist_ok=True)
    gpu = (env_phase or {}).get("gpu") or {}
    if gpu.get("capability"):
        env.setdefault("TORCH_CUDA_ARCH_LIST", ".".join(map(str, gpu["capability"])))
    return env


def command(name: str, cuda: bool, work: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--device",
            "cuda" if cuda else "cpu", "--work", str(work)]


def run_child(name: str, cuda: bool, work: Path, env: dict[str, str], limit: float, log_path: Path) -> dict:
    """Run one phase as a child process (its own process group: a JIT build it started ends with
    it) within ``limit`` seconds; its summary."""
    if limit < 5:
        return {"status": "skipped", "reason": f"no time left in the run's budget ({limit:.0f} s)"}
    if name == "reference":  # the CPU worker sees no GPU, as a CPU worker would
        env = env | {"CUDA_VISIBLE_DEVICES": ""}
    if name == "sweep":  # an AUTO load waits this long for a kernel build in flight, not 10 minutes
        env = env | {"GPTQMODEL_TORCH_OPS_LOCK_TIMEOUT": str(int(max(30, limit / 2)))}
    started = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n===== phase {name} (limit {limit:.0f} s)\n")
        log.flush()
        process = subprocess.Popen(command(name, cuda, work), env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=ROOT, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
            status = None if code == 0 else f"exited with code {code}"
        except subprocess.TimeoutExpired:
            stop(process)
            status = f"timed out after {limit:.0f} s (its figures so far are kept)"
    seconds = time.monotonic() - started
    data = read_phase(work, name)
    if status or data is None:
        return {"status": "timeout" if "timed out" in (status or "") else "failed",
                "reason": status or "wrote no result", "seconds": seconds}
    return {"status": data.get("status", "ok"), "reason": data.get("reason"), "seconds": seconds}


def start_prebuild(cuda: bool, work: Path, env: dict[str, str], log_path: Path, results: dict) -> Any:
    if not cuda:
        results["phases"]["prebuild"] = {"status": "skipped", "reason": "CPU smoke run: GPTQModel's CUDA kernels "
                                         "(Marlin, ExLlama v2) are JIT-compiled with nvcc on a GPU machine only"}
        return None
    results["phases"]["prebuild"] = {"status": "running", "reason": None}
    return subprocess.Popen(command("prebuild", cuda, work), env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def stop(process: Any) -> None:
    """End a phase and everything it started (nvcc, ninja): its process group."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def trim(path: Path, keep: int = 6 * MiB) -> None:
    """Keep a log under the size that comes back from the GPU machine: its head and its tail."""
    if path.is_file() and path.stat().st_size > 2 * keep:
        data = path.read_bytes()
        path.write_bytes(data[:keep] + b"\n[... trimmed ...]\n" + data[-keep:])


def wait_for(process: Any, seconds: float) -> None:
    try:
        process.wait(timeout=max(0.0, seconds))
    except subprocess.TimeoutExpired:
        pass


def finish(results: dict, work: Path, out: Path, prebuild: Any) -> None:
    """Gather the phases' files into the JSON and the report (rewritten after every phase, so a
    run stopped from outside leaves what it had)."""
    from gpu_report import compare, render

    figures = {name: read_phase(work, name) for name in (*ORDER, "prebuild")}
    if prebuild is not None:
        state = results["phases"]["prebuild"]
        if prebuild.poll() is not None and figures["prebuild"]:
            state.update(status=figures["prebuild"].get("status", "ok"), seconds=figures["prebuild"].get("seconds"),
                         reason=figures["prebuild"].get("reason"))
        elif prebuild.poll() is None:
            state.update(status="running", reason="still building when the report was written")
        else:
            state.update(status="failed", reason=f"ended with code {prebuild.returncode} and no result (stopped at "
                                                 "the run's end while still building?): see prebuild.log")
    results["figures"] = figures
    results["comparison"] = compare(figures.get("sweep"), figures.get("reference"), results["device"])
    (out / "gpu_run.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.txt").write_text(render(results))


if __name__ == "__main__":
    raise SystemExit(main())
