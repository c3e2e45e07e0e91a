"""Chaos: kill -9 an actor, then the driver, during a real local sweep; run again; the store is
complete and duplicate-free, no finished row was replaced, the dead driver's lease was taken over
at once, and a third driver started beside the second one refused to run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_util import offline_env

from analysis.views import connect
from orchestrator.store import Store

pytestmark = pytest.mark.chaos


def rows_now(results) -> list[tuple]:
    for _ in range(20):
        if not Store(results).files():
            return []
        try:
            return connect(str(results)).execute("select cell_id, actor, attempts from cells").fetchall()
        except Exception:  # a file replaced between listing and reading: look again
            time.sleep(0.1)
    raise AssertionError("the store stayed unreadable")


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_actor_and_driver_killed_mid_sweep(tmp_path, tiny_llama):
    spec = {
        "name": "chaos",
        "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [{"name": "baseline"}, {"name": "rtn", "sym": [True, False]}],
        "bits": [2, 3, 4, 8],
        "group_sizes": [16, 32],
        # ~1 s per cell on one core: long enough to be killed in the middle of one
        "datasets": [{"name": "docs", "task": "perplexity", "path": "builtin:pydoc-topics",
                      "limit": 300, "seq_len": 128, "batch_size": 8}],
        "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0},
        "cpu_actors": 2,
    }
    path = tmp_path / "chaos.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    env = offline_env()
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results", str(results),
               "--no-progress"]
    total = 1 + 2 * 4 * 2

    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first = wait_for(lambda: rows_now(results), 400, "the first rows")
        victim = int(first[0][1].split("@")[0])
        os.kill(victim, signal.SIGKILL)  # an actor, busy with its next cell
        wait_for(lambda: len(rows_now(results)) >= len(first) + 3, 400, "rows after the actor kill")
        driver.kill()  # kill -9 the driver mid-sweep
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
        # The embedded Ray dies with its driver's session; make sure nothing is left behind.
        os.killpg(driver.pid, signal.SIGKILL) if _group_alive(driver.pid) else None

    interrupted = len(rows_now(results))
    done = connect(str(results)).execute("select count(*) from cells where status = 'ok'").fetchone()[0]
    assert 0 < done < total
    crashed = connect(str(results)).execute(
        "select count(*) from cells where error_class = 'crash'").fetchone()[0]
    assert crashed >= 1 and interrupted > done  # the actor's death is on record already

    finished = set(connect(str(results)).execute(
        "select cell_id, actor, write_generation, write_seq from cells where status = 'ok'").fetchall())
    assert {r[2] for r in finished} == {1}

    # the killed driver's lease (its process is gone) is taken over at once
    again = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (Store(results).leases().current("chaos") or _Gen0()).generation == 2, 120,
                 "the second driver's lease")
        third = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert third.returncode == 3 and f"held by pid {again.pid}" in third.stderr, third.stderr[-2000:]
        out, err = again.communicate(timeout=600)
    finally:
        if again.poll() is None:
            again.kill()
    assert again.returncode == 0, out[-2000:] + err[-3000:]
    assert f"ran {total - done} cells" in out
    # every ok row of the interrupted run is still the one it wrote
    after = set(connect(str(results)).execute(
        "select cell_id, actor, write_generation, write_seq from cells where write_generation = 1").fetchall())
    assert after == finished

    rows = rows_now(results)
    assert len(rows) == total and len({r[0] for r in rows}) == total
    on_disk = sum(pq.read_metadata(f).num_rows for f in Store(results).files())
    assert on_disk == total  # compacted at the end: no duplicate row on disk either
    con = connect(str(results))
    assert con.execute("select count(*) from cells where status = 'ok'").fetchone() == (total,)
    retried = con.execute("select count(*) from cells where attempts >= 2").fetchone()[0]
    assert retried >= 1  # the cell the killed actor was running ran again


class _Gen0:
    generation = 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
