"""Preflight judges what it can see: facts of the machines cells run on are checked there.

A Ray cluster of two nodes on this machine, shaped like KubeRay's: a head with no CPUs for work
(the driver runs beside it) and a worker node. The two see different home directories (each
node's processes have their own ``HOME``), as a head pod and a worker pod see different
mounts: ``~/models/tiny`` exists only on the worker. The driver must not skip cells for a path
only the workers have, and a path that exists nowhere is skipped with the worker's name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from cluster_util import start_node, stop_group, wait_for_port

from analysis.views import connect

pytestmark = pytest.mark.cluster


@pytest.fixture
def two_homes_cluster(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="qsp-", dir="/tmp"))  # short: Ray's socket paths
    head_home, worker_home = base / "head-home", base / "worker-home"
    head_home.mkdir()
    worker_home.mkdir()
    (base / "ray").mkdir()
    head, gcs, head_log = start_node(head_home, base / "ray", None, cpus=0, gpus=0, log_name="head.log")
    processes, logs = [head], [head_log]
    try:
        wait_for_port(gcs, 90, head)
        worker, _, worker_log = start_node(worker_home, base / "ray", gcs, cpus=2, gpus=0, log_name="worker.log")
        processes.append(worker)
        logs.append(worker_log)
        env = {**os.environ, "HOME": str(head_home), "RAY_ADDRESS": f"127.0.0.1:{gcs}",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        probe = ("import ray, time; ray.init(); t = time.monotonic()\n"
                 "while ray.cluster_resources().get('CPU', 0) < 2 and time.monotonic() - t < 90: time.sleep(0.5)\n"
                 "print(ray.cluster_resources().get('CPU', 0))")
        seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
        assert seen.stdout.strip().endswith("2.0"), seen.stderr[-2000:]
        yield env, head_home, worker_home
    finally:
        for process in reversed(processes):
            stop_group(process, grace_s=5)
        for log in logs:
            log.close()
        shutil.rmtree(base, ignore_errors=True)


def test_paths_are_judged_on_the_worker_not_the_driver(two_homes_cluster, tmp_path, tiny_llama):
    env, head_home, worker_home = two_homes_cluster
    shutil.copytree(tiny_llama, worker_home / "models" / "tiny")
    (worker_home / "data").mkdir()
    from pydoc_data.topics import topics

    (worker_home / "data" / "prose.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:4]))
    spec = {
        "name": "where",
        "models": [{"name": "tiny", "path": "~/models/tiny"}],
        "methods": [{"name": "baseline"}],
        "datasets": [
            {"name": "on-worker", "task": "perplexity", "path": "~/data/prose.txt", "limit": 2, "seq_len": 32},
            {"name": "nowhere", "task": "perplexity", "path": "~/data/nowhere.txt", "limit": 2, "seq_len": 32},
        ],
        "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0},
    }
    path = tmp_path / "where.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "r"
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results",
                             str(results), "--no-progress"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = connect(str(results)).execute(
        "select dataset, status, checked_on, error_message from cells order by dataset").fetchall()
    host = socket.gethostname()
    assert rows[0][:3] == ("nowhere", "skipped", f"worker {host}")
    assert "dataset file ~/data/nowhere.txt does not exist (checked on worker" in rows[0][3]
    assert rows[1][:2] == ("on-worker", "ok"), rows[1]
