"""Models bigger than one GPU (issue 19.4): ``gpus_per_actor: N`` on a model entry gives its
groups actors of N GPUs, packed per node; the groups of each actor size run as a phase. On
logical GPUs (no CUDA here) the packing and the rows' ``actor_gpus`` are checked; loading across
real GPUs (``device_map="auto"``) needs CUDA and is skipped without it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from cluster_util import offline_env

from orchestrator.spec import SpecError, parse_spec
from orchestrator.store import Store


def nodes(*shapes):
    """``ray.nodes()`` of alive nodes with (CPUs, GPUs)."""
    return [{"NodeID": f"n{i}", "Alive": True, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}
            for i, (cpus, gpus) in enumerate(shapes)]


@pytest.mark.parametrize(("per", "expected"), [
    (1, [("n1", 8, 12), ("n2", 8, 12)]),
    (2, [("n1", 4, 24), ("n2", 4, 24)]),
    (3, [("n1", 2, 48), ("n2", 2, 48)]),  # 3 + 3 of 8 GPUs: two actors a node, two GPUs idle
    (8, [("n1", 1, 96), ("n2", 1, 96)]),
])
def test_actors_of_n_gpus_pack_per_node(monkeypatch, per, expected):
    import ray

    from orchestrator.driver import ActorPool

    # a CPU-heavy head with no GPU beside two 8-GPU workers of 96 CPUs (KubeRay's, SLURM's shape)
    monkeypatch.setattr(ray, "nodes", lambda: nodes((64, 0), (96, 8), (96, 8)))
    monkeypatch.setattr(ray, "remote", lambda cls: cls)
    pool = ActorPool(max_actors=100, cpu_actors=1, gpus_per_actor=per)
    assert pool._slots() == expected
    assert pool.size == sum(n for _, n, _ in expected)
    assert pool.options == {"num_gpus": per, "num_cpus": expected[0][2]}


def test_no_node_big_enough_means_no_gpu_slots(monkeypatch):
    import ray

    from orchestrator.driver import ActorPool

    monkeypatch.setattr(ray, "nodes", lambda: nodes((64, 0), (96, 8)))
    monkeypatch.setattr(ray, "remote", lambda cls: cls)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 160, "GPU": 8})
    monkeypatch.setenv("QSWEEP_GPU_WAIT_S", "0")
    pool = ActorPool(max_actors=4, cpu_actors=1, gpus_per_actor=16)
    assert "num_gpus" not in pool.options and not pool.wait_for_gpus()


def test_gpus_per_actor_is_checked_and_left_out_of_the_identity():
    from orchestrator.cells import expand

    base = {"name": "s", "methods": [{"name": "baseline"}],
            "datasets": [{"name": "d", "task": "perplexity", "path": "/d.txt"}]}
    one = expand(parse_spec({**base, "models": [{"name": "m", "path": "/m"}]}))
    two = expand(parse_spec({**base, "models": [{"name": "m", "path": "/m", "gpus_per_actor": 2}]}))
    assert [c.cell_id for c in one] == [c.cell_id for c in two]  # where it runs, not what it is
    assert two[0].model.gpus_per_actor == 2
    with pytest.raises(SpecError, match=r"models\[0\]\.gpus_per_actor.*whole number"):
        parse_spec({**base, "models": [{"name": "m", "path": "/m", "gpus_per_actor": 0}]})


def run(tmp_path, spec: dict, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results", str(results),
                          "--no-progress", *args], cwd=tmp_path, env=offline_env(), capture_output=True,
                         text=True, timeout=900)
    rows = Store(str(results)).read().to_pylist() if results.exists() else []
    return out, rows


@pytest.mark.cluster
def test_phases_of_actor_sizes_on_four_logical_gpus(tmp_path, tiny_llama, text_file):
    data = {"name": "corpus", "task": "perplexity", "path": str(text_file), "limit": 2, "seq_len": 32}
    spec = {"name": "sizes", "methods": [{"name": "baseline"}, {"name": "rtn"}], "bits": [4], "group_sizes": [32],
            "datasets": [data],
            "models": [{"name": "wide", "path": str(tiny_llama), "gpus_per_actor": 2},
                       {"name": "narrow", "path": str(tiny_llama)}]}
    out, rows = run(tmp_path, spec, "--gpus", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r["error_message"] for r in rows]
    assert {r["model"]: r["actor_gpus"] for r in rows} == {"wide": 2, "narrow": 1}


@pytest.mark.cluster
def test_a_model_needing_more_gpus_than_any_node_is_a_row_that_says_so(tmp_path, tiny_llama, text_file):
    data = {"name": "corpus", "task": "perplexity", "path": str(text_file), "limit": 2, "seq_len": 32}
    spec = {"name": "toobig", "methods": [{"name": "baseline"}], "datasets": [data],
            "models": [{"name": "huge", "path": str(tiny_llama), "gpus_per_actor": 8},
                       {"name": "small", "path": str(tiny_llama)}]}
    out, rows = run(tmp_path, spec, "--gpus", "2")
    by_model = {r["model"]: r for r in rows}
    assert by_model["small"]["status"] == "ok", out.stderr[-3000:]
    huge = by_model["huge"]
    assert huge["status"] == "timeout" and huge["error_stage"] == "preflight"
    assert "no node with 8 GPUs" in huge["error_message"] and "QSWEEP_GPU_WAIT_S" in huge["error_message"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: loading across them "
                    "(device_map='auto') cannot run on this machine")
def test_a_model_loads_across_two_gpus(tiny_llama):
    from tasks.models import load_model, spread

    model, _ = load_model(str(tiny_llama), "float32", "cuda")
    assert spread(model)
