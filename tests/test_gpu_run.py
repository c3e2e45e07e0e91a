"""bench/gpu_run.py's CPU smoke mode (issue 23): the GPU run's code paths at tiny sizes, every
CUDA-only part skipped with its reason; and its CPU-vs-device comparison on made-up rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

METHODS = {"baseline", "rtn", "int4", "nf4", "int8", "fp8", "gptq", "awq"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_run.py"), "--device", "cpu",
                           "--out", str(out), "--work", str(work)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.json", "phases.log", "report.txt"]
    results = json.loads((out / "gpu_run.json").read_text())
    report = (out / "report.txt").read_text()
    assert done.stdout.strip().endswith(report.strip().splitlines()[-1])  # the printed report is the file's
    return results, report


def test_every_phase_ran_and_the_cuda_only_ones_say_why(smoke):
    results, report = smoke
    assert results["mode"] == "cpu-smoke" and results["device"] == "cpu"
    phases = results["phases"]
    assert {name: phases[name]["status"] for name in ("env", "decode", "sweep", "reference", "memory")} == \
        dict.fromkeys(("env", "decode", "sweep", "reference", "memory"), "ok"), phases
    assert phases["prebuild"]["status"] == "skipped" and "nvcc" in phases["prebuild"]["reason"]
    for heading in ("== (a) demo-style sweep on cpu", "== (b) decode speed", "== (c) memory accounting",
                    "== not measured, with the reason", "== phases"):
        assert heading in report
    skipped = report.split("== not measured, with the reason")[1].split("== phases")[0]
    lines = [line for line in skipped.splitlines() if line.startswith("- ")]
    assert len(lines) >= 8
    for line in lines:  # every skipped part gives a reason after its name
        what, _, why = line[2:].partition(": ")
        assert what and len(why.strip()) > 10, line


def test_sweep_rows_name_their_kernel_and_int4_is_skipped_on_cpu(smoke):
    results, _ = smoke
    for phase in ("sweep", "reference"):
        rows = results["figures"][phase]["rows"]
        assert {row["method"] for row in rows} == METHODS
        for row in rows:
            if row["method"] == "int4":
                assert row["status"] == "skipped" and row["error_class"] == "unsupported"
                assert "needs a CUDA GPU" in row["error_message"]
                continue
            assert row["status"] == "ok", row
            assert row["kernel"] and math.isfinite(row["primary_value"]) and row["primary_value"] > 1
            assert row["throughput_tok_s"] > 0 and row["profile_device"].startswith("cpu")
        kernels = {row["method"]: row.get("kernel") for row in rows}
        assert kernels["gptq"] == "gptq_torch" and kernels["awq"] == "awq_torch"  # CPU: torch kernels
        assert kernels["baseline"] == "dense" and kernels["rtn"] == "dequantized"
    comparison = results["comparison"]
    assert comparison["status"] == "ok" and comparison["compared"] == 7 and comparison["outside"] == 0
    assert "smoke" in comparison["note"]
    for cell in comparison["cells"]:
        if cell["verdict"] == "not compared":
            assert cell["cell"].startswith("int4") and "needs a CUDA GPU" in cell["reason"]
        else:
            assert abs(cell["relative_difference"]) <= cell["tolerance"]


def test_decode_figures_and_what_needs_cuda(smoke):
    results, _ = smoke
    shapes = results["figures"]["decode"]["shapes"]
    assert set(shapes) == {"llama-3.2-1b-shaped", "llama-3.1-8b-shaped"}
    for shape, record in shapes.items():
        batches = record["bf16"]["batches"]
        assert [b["batch_size"] for b in batches] == [1, 8, 32]
        for b in batches:
            assert b["tokens_per_s"] > 0 and 0 < b["tpot_p50_ms"] <= b["tpot_p95_ms"] and b["ttft_ms"] > 0
            assert b["weight_bytes_read_per_step"] > 0 and b["rss_bytes"] > 0
            assert b["cuda_allocated_bytes"] is None and b["bandwidth_fraction_datasheet"] is None
        assert set(record["bf16"]["skipped"]) == {"bandwidth_fraction", "graph", "cuda_memory"}
        assert "CUDA only" in record["int4"]["skipped"]["int4"]
    # a step reads every bf16 weight but the input embedding's (one row a sequence); tied to the
    # head (the 1B shape) it is read whole there, once
    embedding = 259 * 128  # the smoke run's vocabulary x hidden width
    for shape, untied in (("llama-3.2-1b-shaped", 0), ("llama-3.1-8b-shaped", embedding)):
        params = shapes[shape]["model"]["params"]
        assert shapes[shape]["bf16"]["weight_bytes_read_per_step"] == 2 * (params - untied), shape


def test_memory_stages_against_the_plan(smoke):
    results, report = smoke
    memory = results["figures"]["memory"]
    assert list(memory["stages"]) == ["load", "calibrate", "quantize", "evaluate"]
    assert set(memory["plan"]) >= {"load", "quantize", "evaluate"} and memory["plan_peak_bytes"] > 0
    for stage in memory["stages"].values():
        assert stage["peak"]["rss_bytes"] > 0 and stage["peak"]["cuda_allocated_bytes"] is None
    assert memory["kernel"] == "gptq_torch" and "GPU figures" in memory["skipped"]["cuda_memory"]
    assert memory["resident_base_bytes"] > 0  # on the host the base stays beside its copy, and says so
    assert "plan: evaluate:" in report


def test_comparison_flags_a_cell_outside_its_tolerance():
    from gpu_report import compare

    def row(method, params, value, status="ok"):
        return {"cell_id": f"{method}-id", "method": method, "params": params, "bits": 4, "group_size": 64,
                "status": status, "primary_value": value, "kernel": "k", "error_message": None}

    device = {"rows": [row("rtn", {"sym": True}, 10.3), row("gptq", {"engine": "gptqmodel", "sym": False}, 10.3),
                       row("nf4", {}, None, "failed")]}
    cpu = {"rows": [row("rtn", {"sym": True}, 10.0), row("gptq", {"engine": "gptqmodel", "sym": False}, 10.0),
                    row("nf4", {}, 9.0)]}
    result = compare(device, cpu, "cuda")
    verdicts = {cell["cell"].split()[0]: cell["verdict"] for cell in result["cells"]}
    assert verdicts == {"rtn": "OUTSIDE", "gptq/gptqmodel": "within", "nf4": "not compared"}  # 3% vs 2% / 5%
    assert result["outside"] == 1 and result["compared"] == 2
    assert compare(device, None, "cuda")["status"] == "skipped"
