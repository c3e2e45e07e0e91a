"""Helpers for the tests that start real daemons (a Ray head, SLURM): free ports, waiting for a
port, and stopping only the processes a test started (their own process group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


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
