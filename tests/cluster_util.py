"""Helpers for the tests that start real daemons (a Ray head, SLURM): free ports, waiting for a
port, and stopping only the processes a test started (their own process group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment for a `qsweep` subprocess on an embedded Ray: offline, no
    usage stats, no RAY_ADDRESS inherited from a cluster test."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process {process.args[0]} exited ({process.returncode}) "
                                   f"before port {port} opened") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s") from None
            time.sleep(0.3)


def stop_group(process: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM then SIGKILL to the process group of ``process`` (started with
    ``start_new_session=True``), so that its children go too and nothing else does."""
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # children that outlived the leader
    except ProcessLookupError:
        pass


def write_tiny_spec(path, name: str, model, text_file, rtn: dict | None = None) -> None:
    """A small sweep on the tiny Llama: baseline + rtn 4-bit group 32, 2 windows of 32 tokens."""
    import yaml

    path.write_text(yaml.safe_dump({
        "name": name,
        "models": [{"name": "tiny-llama", "path": str(model)}],
        "methods": [{"name": "baseline"}, {"name": "rtn", **(rtn or {})}],
        "bits": [4],
        "group_sizes": [32],
        "datasets": [{"name": "corpus", "task": "perplexity", "path": str(text_file), "limit": 2,
                      "seq_len": 32}],
    }))


def start_node(home: Path, temp_dir: Path, head_port: int | None, cpus: int, gpus: int, log_name: str):
    """`ray start` of a head (``head_port`` None) or a worker joining it, with its own ports,
    ``HOME`` and logical CPUs / GPUs; returns (process, GCS port, log file) once the node's own
    node-manager port listens (so the next node's free ports cannot be the same ones)."""
    ports = free_ports(8)
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", str(gpus),
              "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
              "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
              "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
              "--object-store-memory", str(300 * 2**20),  # several nodes share this machine's /dev/shm
              "--disable-usage-stats", "--block"]
    if head_port is None:
        gcs = ports[6]
        command = [str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--include-dashboard", "false",
                   "--ray-client-server-port", str(ports[7]), "--temp-dir", str(temp_dir), *common]
    else:
        gcs = head_port
        command = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{head_port}", *common]
    log = open(temp_dir.parent / log_name, "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    wait_for_port(ports[0], 90, process)
    return process, gcs, log
