"""Actors heal: a sticky CUDA error, a Ray error and an actor that cannot be placed each become a
row and a replacement actor, never a dead driver.

The faults are injected into the real actors of a real local sweep by a ``sitecustomize`` module
on ``PYTHONPATH`` (every Ray worker process imports it): it wraps one qsweep function so that it
raises the exception a GPU or Ray would raise, once per sweep (a marker file says it did).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from analysis.views import connect

ROOT = Path(__file__).resolve().parent.parent

INJECT = textwrap.dedent('''
    import os, sys
    MARKER = os.environ.get("QSWEEP_TEST_FAULT_MARKER")
    FAULT = os.environ.get("QSWEEP_TEST_FAULT")

    def _once():
        try:
            fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def _patch(module):
        if FAULT == "sticky-cuda":
            real = module.profile_speed
            def profile_speed(*args, **kwargs):
                if _once():
                    raise RuntimeError("CUDA error: an illegal memory access was encountered\\n"
                                       "CUDA kernel errors might be asynchronously reported")
                return real(*args, **kwargs)
            module.profile_speed = profile_speed
        elif FAULT == "ray-oom":
            real = module.profile_sizes
            def profile_sizes(*args, **kwargs):
                if _once():
                    import ray
                    raise ray.exceptions.OutOfMemoryError(
                        "Task was killed due to the node running low on memory (memory monitor)")
                return real(*args, **kwargs)
            module.profile_sizes = profile_sizes
        elif FAULT == "hang-start":
            import time
            def WorkerState(*args, **kwargs):
                time.sleep(3600)  # an actor that never becomes ready
            module.WorkerState = WorkerState

    class _Hook:
        """Patch tasks.worker right after it is executed, in Ray's worker processes only."""
        def find_spec(self, name, path=None, target=None):
            if name != "tasks.worker" or "ray" not in sys.modules:
                return None
            sys.meta_path.remove(self)
            import importlib.util
            spec = importlib.util.find_spec(name)
            real_exec = spec.loader.exec_module
            def exec_module(module):
                real_exec(module)
                _patch(module)
            spec.loader.exec_module = exec_module
            return spec

    if MARKER and FAULT:
        sys.meta_path.insert(0, _Hook())
''')


def run_with_fault(tmp_path, tiny_llama, fault: str, extra_env=None, spec_extra=None):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INJECT)
    spec = {
        "name": f"heal-{fault}",
        "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [{"name": "baseline"}],
        "datasets": [{"name": "docs", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": 2,
                      "seq_len": 32}],
        "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0},
        **(spec_extra or {}),
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), QSWEEP_TEST_FAULT=fault,
               QSWEEP_TEST_FAULT_MARKER=str(tmp_path / "fault-fired"), **(extra_env or {}))
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results",
                             str(tmp_path / "r"), "--no-progress"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    return result


def test_a_sticky_cuda_error_replaces_the_actor_and_retries_the_cell(tmp_path, tiny_llama):
    result = run_with_fault(tmp_path, tiny_llama, "sticky-cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fault-fired").exists()
    faulted_pid = int((tmp_path / "fault-fired").read_text())
    (row,) = connect(str(tmp_path / "r")).execute("select status, attempts, actor from cells").fetchall()
    # the actor that met the error exited; the cell ran again, on a fresh actor, and is ok
    assert row[0] == "ok" and row[1] == 2 and int(row[2].split("@")[0]) != faulted_pid


def test_a_ray_error_in_the_actor_is_a_row_and_a_retry_not_a_dead_driver(tmp_path, tiny_llama):
    result = run_with_fault(tmp_path, tiny_llama, "ray-oom")
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = connect(str(tmp_path / "r")).execute("select status, attempts from cells").fetchall()
    assert row == ("ok", 2)  # an oom attempt (Ray's memory monitor), then the replacement's run
    assert "memory monitor" in result.stderr


def test_an_actor_that_cannot_be_placed_becomes_rows(tmp_path, tiny_llama):
    result = run_with_fault(tmp_path, tiny_llama, "hang-start",
                            extra_env={"QSWEEP_ACTOR_START_TIMEOUT_S": "5"},
                            spec_extra={"retries": {"crash": 1}})
    assert result.returncode == 0, result.stderr[-3000:]  # the driver ends normally
    (row,) = connect(str(tmp_path / "r")).execute(
        "select status, error_class, attempts, error_message from cells").fetchall()
    assert row[:3] == ("failed", "crash", 2)
    assert "no actor could be placed within 5 s" in row[3]


@pytest.mark.parametrize("message", [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered",
    "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus",
])
def test_sticky_device_errors_are_crashes(message):
    from tasks.errors import classify
    from tasks.worker import _failure

    assert classify(RuntimeError(message)) == "crash"
    from tasks.errors import DeviceLost

    with pytest.raises(DeviceLost):
        _failure(RuntimeError(message), "evaluate")
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
