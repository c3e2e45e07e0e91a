"""Failure paths forced for real: a cell past timeout_s, an evaluation out of memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import yaml

from analysis.views import connect


def run_cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_timeout_kills_the_actor_retries_and_records(tmp_path, tiny_llama):
    spec = {
        "name": "slow",
        "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [{"name": "baseline"}],
        "datasets": [
            {"name": "quick", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": 2, "seq_len": 32},
            # stride 1: 100,000 windows of 128 tokens, one forward each: far past the limit below
            {"name": "endless", "task": "perplexity", "path": "builtin:pydoc-topics", "seq_len": 128,
             "stride": 1, "limit": 100_000, "batch_size": 1},
        ],
        "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0},
        # long enough that loading and preparing fit on a loaded machine (at 10 s the limit fell in
        # quantize with two CPU-heavy processes beside it), far short of the endless dataset
        "timeout_s": 30,
        "retries": {"timeout": 1},
    }
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_cli("run", str(path), "--results", str(tmp_path / "r"), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = connect(str(tmp_path / "r")).execute(
        "select dataset, status, error_class, error_stage, attempts, error_message from cells order by dataset").fetchall()
    assert rows[0][:5] == ("endless", "timeout", "timeout", "evaluate", 2)
    assert "timeout_s=30" in rows[0][5] and "killed" in rows[0][5]
    assert rows[1][:2] == ("quick", "ok")


OOM_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from orchestrator.spec import parse_spec
    from orchestrator.cells import expand, group_cells
    from tasks.worker import WorkerState, run_group_rows

    model, oom_retries = sys.argv[1], int(sys.argv[2])
    spec = parse_spec({"name": "oom", "models": [{"name": "tiny", "path": model}],
                       "methods": [{"name": "baseline"}],
                       "datasets": [{"name": "big-batch", "task": "perplexity", "path": "builtin:pydoc-topics",
                                     "limit": 1024, "seq_len": 256, "batch_size": 1024}]})
    state = WorkerState(threads=1)
    state.base_model(model, "float32")
    # Cap the address space 400 MB above what is mapped now: a batch of 1024 windows needs
    # more than that (its logits alone are 270 MB, twice), a batch of 64 much less.
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 400 * 2**20, resource.RLIM_INFINITY))
    (group,) = group_cells(expand(spec))
    rows = list(run_group_rows(group, state, oom_retries=oom_retries).values())
    print(json.dumps({k: rows[0].get(k) for k in ("status", "error_class", "error_stage", "attempts")}))
""")


def oom_run(tiny_llama, retries: int) -> dict:
    result = subprocess.run([sys.executable, "-c", OOM_SCRIPT, str(tiny_llama), str(retries)],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_out_of_memory_is_retried_at_a_smaller_batch_then_recorded(tiny_llama):
    assert oom_run(tiny_llama, retries=0) == {"status": "failed", "error_class": "oom",
                                               "error_stage": "evaluate", "attempts": 1}
    recovered = oom_run(tiny_llama, retries=4)
    assert recovered["status"] == "ok" and recovered["attempts"] >= 2


def test_tokens_never_land_in_rows(monkeypatch):
    from tasks.errors import redact
    from tasks.worker import _failure

    secret = "hf_" + "Q" * 30
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    try:
        raise RuntimeError(f"401 for token {secret} and key very-secret-value")
    except RuntimeError as exc:
        row = _failure(exc, "load")
    assert secret not in row["error_message"] and secret not in row["error_traceback"]
    assert "very-secret-value" not in row["error_message"]
    assert redact("Bearer hf_" + "a1" * 15) == "Bearer hf_***"


def test_remote_code_stays_off_unless_asked():
    from orchestrator.spec import parse_spec

    base = {"name": "t", "methods": [{"name": "baseline"}],
            "datasets": [{"name": "d", "task": "perplexity", "path": "/d.txt"}]}
    off = parse_spec(dict(base, models=[{"name": "m", "path": "/m"}]))
    on = parse_spec(dict(base, models=[{"name": "m", "path": "/m", "trust_remote_code": True}]))
    assert off.models[0].trust_remote_code is False and on.models[0].trust_remote_code is True
