"""Spec → local Ray (2 logical GPUs) → store → SQL, on a tiny random Llama."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from analysis.views import connect


def qsweep(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sweep_end_to_end_on_two_logical_gpus(tmp_path, tiny_llama, text_file):
    spec = {
        "name": "tiny",
        "models": [{"name": "tiny-llama", "path": str(tiny_llama)}],
        "methods": [{"name": "baseline"}, {"name": "rtn", "sym": [True, False]}],
        "bits": [4],
        "group_sizes": [32, 64],
        "datasets": [
            {"name": "corpus", "task": "perplexity", "path": str(text_file), "limit": 3, "seq_len": 32},
            {"name": "gone", "task": "perplexity", "path": str(tmp_path / "missing.txt")},
        ],
    }
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"

    first = qsweep("run", str(spec_path), "--results", str(results), "--gpus", "2", "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ran 5 cells" in first.stdout

    con = connect(str(results))
    rows = con.execute("""select dataset, status, error_class, error_message, actor, device,
                                 fallback, layers_fallback, primary_value, weight_bytes, method
                          from cells""").fetchall()
    assert len(rows) == 10  # (1 baseline + 2 sym x 2 groups) x 2 datasets
    ok = [r for r in rows if r[0] == "corpus"]
    skipped = [r for r in rows if r[0] == "gone"]
    assert {r[1] for r in ok} == {"ok"} and {r[1] for r in skipped} == {"skipped"}
    assert all(r[2] == "data" and "missing.txt does not exist" in r[3] for r in skipped)
    assert len({r[4] for r in ok}) == 2  # two actors, one per logical GPU
    assert {r[5] for r in ok} == {"cpu"}  # logical GPUs have no CUDA device behind them
    g64 = [r for r in ok if r[6] == "ragged"]
    assert len(g64) == 2 and all(r[7] == 2 * 6 for r in g64)  # hidden 96 layers: 6 per block
    baseline = next(r for r in ok if r[10] == "baseline")
    assert all(r[9] < baseline[9] for r in ok if r[10] == "rtn")
    assert con.execute("select count(*) from metrics where metric = 'token_perplexity'").fetchone() == (5,)
    layouts = con.execute("""select requested_group_size, group_layout, count(*) from layers
                             where method = 'rtn' and quantized group by all order by all""").fetchall()
    # width 96 (6 layers a block) at group 64: a ragged last group of 32; width 128 (down_proj) divides
    assert layouts == [(32, "3x32", 24), (32, "4x32", 4), (64, "1x64+32", 24), (64, "2x64", 4)]

    again = qsweep("run", str(spec_path), "--results", str(results), "--gpus", "2", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ran 0 cells" in again.stdout

    spec["group_sizes"].append(16)
    spec_path.write_text(yaml.safe_dump(spec))
    more = qsweep("run", str(spec_path), "--results", str(results), "--gpus", "2", "--no-progress", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "ran 2 cells" in more.stdout  # only the new group size, on the dataset that exists
    assert connect(str(results)).execute("select count(*) from cells").fetchone() == (14,)

    # --rerun: the cells a rule matches run again (their new rows supersede the old), nothing else
    rerun = qsweep("run", str(spec_path), "--results", str(results), "--gpus", "2", "--no-progress",
                   "--rerun", "method=rtn,group_size=16", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "ran 2 cells" in rerun.stdout
    con = connect(str(results))
    assert con.execute("select count(*) from cells").fetchone() == (14,)
    assert con.execute("select min(attempts) from cells where group_size = 16 and status = 'ok'").fetchone() == (2,)

    status = qsweep("status", str(spec_path), "--results", str(results), cwd=tmp_path)
    assert status.returncode == 0
    assert "14 cells; ok: 7, failed: 0, timeout: 0, skipped: 7, missing: 0" in status.stdout


def test_a_groups_datasets_spread_over_idle_actors(tmp_path, tiny_llama, text_file):
    # One baseline group (a load, no quantization) with two long datasets, two logical GPUs: the
    # scheduler (orchestrator.schedule) expects the split to end sooner, so each actor runs one.
    corpus = {"task": "perplexity", "path": str(text_file), "limit": 400, "seq_len": 32}
    spec = {"name": "spread", "models": [{"name": "tiny-llama", "path": str(tiny_llama)}],
            "methods": [{"name": "baseline"}],
            "datasets": [{"name": "first", **corpus}, {"name": "second", **corpus}],
            "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}}
    spec_path = tmp_path / "spread.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    run = qsweep("run", str(spec_path), "--results", str(results), "--gpus", "2", "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ran 2 cells" in run.stdout
    rows = connect(str(results)).execute("select dataset, status, group_id, actor, attempts from cells").fetchall()
    assert sorted(r[0] for r in rows) == ["first", "second"] and {r[1] for r in rows} == {"ok"}
    assert len({r[2] for r in rows}) == 1  # one quantization group ...
    assert len({r[3] for r in rows}) == 2  # ... run by two actors, each its own part
    assert {r[4] for r in rows} == {1}
    again = qsweep("run", str(spec_path), "--results", str(results), "--gpus", "2", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0 and "ran 0 cells" in again.stdout, again.stderr[-3000:]
