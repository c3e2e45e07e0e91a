"""Clusters as they are shaped: a CPU-heavy head with no GPUs beside GPU worker nodes with few
CPUs (KubeRay's and SLURM's shape), several `ray start` nodes on this machine with logical GPUs.
Every logical GPU gets an actor, and an actor's CPU ask comes from its node, not the cluster's
total; a node that joins mid-sweep gets actors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from cluster_util import start_node, stop_group, wait_for_port

from analysis.views import connect

pytestmark = pytest.mark.cluster


class Nodes:
    """A head and workers started by the test, stopped at the end."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="qsc-", dir="/tmp"))  # short: Ray's socket paths
        (self.base / "ray").mkdir()
        self.home = self.base / "home"
        self.home.mkdir()
        self.processes, self.logs, self.gcs = [], [], None

    def start(self, cpus: int, gpus: int) -> None:
        head = self.gcs is None
        process, gcs, log = start_node(self.home, self.base / "ray", None if head else self.gcs,
                                       cpus=cpus, gpus=gpus, log_name=f"node{len(self.processes)}.log")
        self.processes.append(process)
        self.logs.append(log)
        if head:
            self.gcs = gcs
            wait_for_port(gcs, 90, process)

    def env(self) -> dict:
        env = {**os.environ, "HOME": str(self.home), "RAY_ADDRESS": f"127.0.0.1:{self.gcs}",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        return env

    def wait_for_gpus(self, gpus: int) -> None:
        probe = ("import ray, time; ray.init(); t = time.monotonic()\n"
                 f"while ray.cluster_resources().get('GPU', 0) < {gpus} and time.monotonic() - t < 90: time.sleep(0.5)\n"
                 "print(ray.cluster_resources().get('GPU', 0))")
        seen = subprocess.run([sys.executable, "-c", probe], env=self.env(), capture_output=True, text=True,
                              timeout=180)
        assert seen.stdout.strip().endswith(f"{gpus}.0"), seen.stderr[:1500] + self.node_logs()

    def node_logs(self) -> str:
        return "".join(f"\n== {log.name}\n" + Path(log.name).read_text()[-1500:] for log in self.logs)

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_group(process, grace_s=5)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def nodes():
    cluster = Nodes()
    try:
        yield cluster
    finally:
        cluster.stop()


def sweep(tmp_path, tiny_llama, limit: int, bits=(2, 3, 4, 8), group_sizes=(32,)) -> Path:
    spec = {
        "name": "shapes",
        "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [{"name": "baseline"}, {"name": "rtn"}],
        "bits": list(bits),
        "group_sizes": list(group_sizes),
        "datasets": [{"name": "docs", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": limit,
                      "seq_len": 64, "batch_size": 1}],
        "profile": {"prompt_len": 4, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0},
    }
    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(path, results, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results", str(results),
                           "--no-progress"], cwd=path.parent, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_cpu_heavy_head_does_not_starve_the_gpu_nodes(nodes, tmp_path, tiny_llama):
    nodes.start(cpus=6, gpus=0)  # the head: many CPUs, no GPU
    nodes.start(cpus=2, gpus=2)
    nodes.start(cpus=2, gpus=2)
    nodes.wait_for_gpus(4)
    result = run(sweep(tmp_path, tiny_llama, limit=2), tmp_path / "r", nodes.env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = connect(str(tmp_path / "r")).execute("select status, actor from cells").fetchall()
    assert len(rows) == 5 and {r[0] for r in rows} == {"ok"}
    # 10 CPUs / 4 GPUs cluster-wide would ask 2 CPUs per actor: one actor per 2-CPU node. Asked
    # per node (1 CPU per GPU), every logical GPU holds an actor: 5 groups on 4 actors.
    assert len({r[1] for r in rows}) == 4


def test_a_node_that_joins_mid_sweep_gets_actors(nodes, tmp_path, tiny_llama):
    nodes.start(cpus=1, gpus=0)
    nodes.start(cpus=1, gpus=1)  # one GPU at the start: one actor
    nodes.wait_for_gpus(1)
    # 22 groups, about 2 s each on one core: the sweep outlasts the join and the driver's look
    # for new GPU slots (every 10 s), also on a loaded machine
    path = sweep(tmp_path, tiny_llama, limit=100, bits=(2, 3, 4, 5, 6, 7, 8), group_sizes=(16, 32, 64))
    results = tmp_path / "r"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results",
                               str(results), "--no-progress"], cwd=tmp_path, env=nodes.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(results.glob("shapes/cells/*.parquet")):  # the sweep is under way
            assert time.monotonic() < deadline and driver.poll() is None, "no row from the first node"
            time.sleep(0.5)
        nodes.start(cpus=1, gpus=1)  # a node joins while the sweep runs
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-2000:] + err[-3000:]
    rows = connect(str(tmp_path / "r")).execute("select status, host, actor from cells").fetchall()
    assert len(rows) == 22 and {r[0] for r in rows} == {"ok"}
    assert len({r[2] for r in rows}) == 2, err[-3000:]  # the joined node's GPU got an actor, which ran groups
