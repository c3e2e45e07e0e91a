"""The store's promise, tried as a user would break it: a finished row is never replaced by a
lesser one, rows are ordered by the writer's sequence, one driver per sweep, older row files
read by newer code, the artifact cache cannot fail a group."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_util import offline_env, write_tiny_spec
from test_store import row

from analysis.views import connect
from orchestrator import lease as leases
from orchestrator.lease import Holder, LeaseHeld, LeaseLost, acquire
from orchestrator.store import Store

FIXTURES = Path(__file__).parent / "fixtures"


def qsweep(*args, cwd, env_extra=None, timeout=600):
    env = offline_env(**(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cells(results) -> list[tuple]:
    return connect(str(results)).execute(
        "select method, status, primary_value, error_message from cells order by method").fetchall()


# 1. A finished row is never replaced by a lesser one ------------------------------------------

def test_ok_rows_survive_a_dataset_that_moved(tmp_path, tiny_llama):
    data = tmp_path / "prose.txt"
    from pydoc_data.topics import topics

    data.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]))
    spec = tmp_path / "s.yaml"
    write_tiny_spec(spec, "moved", tiny_llama, data)
    results = tmp_path / "r"
    first = qsweep("run", str(spec), "--results", str(results), "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = cells(results)
    assert [r[1] for r in before] == ["ok", "ok"]

    data.rename(tmp_path / "elsewhere.txt")  # or: a login node where the data is not mounted
    again = qsweep("run", str(spec), "--results", str(results), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ran 0 cells" in again.stdout and "rows written: 0" in again.stdout
    assert cells(results) == before  # not a 'skipped ... does not exist' row over the ok one

    # --rerun asks for the cell again; the worker's preflight cannot find the file, and its skip
    # row does not replace the ok row either
    rerun = qsweep("run", str(spec), "--results", str(results), "--no-progress", "--rerun",
                   "method=baseline", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert cells(results) == before
    assert "is not written: the cell's ok row stays" in rerun.stderr


def test_preflight_runs_only_for_cells_without_an_ok_row(tmp_path):
    from orchestrator.driver import make_plan
    from orchestrator.spec import parse_spec

    spec = parse_spec({"name": "p", "models": [{"name": "m", "path": str(tmp_path / "gone")}],
                       "methods": [{"name": "baseline"}],
                       "datasets": [{"name": "d", "task": "perplexity", "path": str(tmp_path / "gone.txt")}]})
    plan = make_plan(spec, None)
    (cell_id,) = plan.skipped
    assert "model directory" in plan.skipped[cell_id].reason
    assert plan.skipped[cell_id].where.startswith("driver ")
    store = Store(tmp_path / "r")
    store.write_rows([dict(row(cell_id), sweep="p")])
    plan = make_plan(spec, store)
    assert plan.skipped == {} and plan.done == {cell_id} and plan.pending == []


# 3. Order by sequence, not by clocks -----------------------------------------------------------

def sequenced(cell_id, generation, seq, minutes, value, status="ok"):
    return dict(row(cell_id, status=status, minutes=minutes, value=value), write_generation=generation,
                write_seq=seq, run_id=f"h:1:g{generation}")


def test_rows_are_ordered_by_the_writer_sequence_not_the_clock(tmp_path):
    from orchestrator.schema import to_table

    store = Store(tmp_path)
    directory = tmp_path / "s" / "cells"
    directory.mkdir(parents=True)
    # generation 2 ran later, on a host whose clock is an hour behind generation 1's
    pq.write_table(to_table([sequenced("a", 1, 5, minutes=60, value=1.0)]), directory / "x.parquet")
    pq.write_table(to_table([sequenced("a", 2, 0, minutes=0, value=2.0)]), directory / "y.parquet")
    # within one run, the counter decides
    pq.write_table(to_table([sequenced("b", 3, 7, minutes=9, value=7.0),
                             sequenced("b", 3, 8, minutes=1, value=8.0)]), directory / "z.parquet")
    expected = [("a", 2.0), ("b", 8.0)]
    assert sorted((r["cell_id"], r["primary_value"]) for r in store.read("s").to_pylist()) == expected
    view = connect(str(tmp_path)).execute("select cell_id, primary_value from cells order by cell_id")
    assert view.fetchall() == expected
    store.compact("s")
    assert sorted((r["cell_id"], r["primary_value"]) for r in store.read("s").to_pylist()) == expected
    assert sum(pq.read_metadata(f).num_rows for f in store.files("s")) == 2


def test_an_ok_row_outranks_a_later_failure(tmp_path):
    store = Store(tmp_path)
    store.write_rows([sequenced("a", 1, 0, 0, 3.0)])
    store.compact("s")
    store.write_rows([sequenced("a", 2, 0, 5, float("nan"), status="failed")])
    assert [(r["status"], r["primary_value"]) for r in store.read("s").to_pylist()] == [("ok", 3.0)]


# 4. One driver per sweep at a time ---------------------------------------------------------

def test_lease_refuses_a_second_holder_and_hands_over_on_release(tmp_path):
    backend = Store(tmp_path).leases()
    first = acquire(backend, "s", heartbeat_s=0.2)
    with pytest.raises(LeaseHeld, match=rf"pid {os.getpid()} on host {socket.gethostname()} since"):
        acquire(backend, "s")
    time.sleep(0.6)
    assert backend.current("s").beat >= 1  # the holder's heartbeat
    first.release()
    second = acquire(backend, "s")
    assert second.generation == first.generation + 1
    assert backend.generations("s") == [second.generation]  # older leases pruned
    second.release()


def test_a_dead_drivers_lease_is_taken_over(tmp_path):
    backend = Store(tmp_path).leases()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    assert backend.create("s", Holder(generation=4, host=socket.gethostname(), pid=int(dead),
                                      since="earlier", beat_at=time.time()))
    taken = acquire(backend, "s")  # same host, its process is gone: at once
    assert taken.generation == 5
    taken.release()

    # another host's driver whose heartbeat stopped: taken over once it is stale_after_s old...
    backend.create("s", Holder(generation=6, host="elsewhere", pid=1, since="earlier", beat_at=time.time()))
    with pytest.raises(LeaseHeld, match="host elsewhere"):
        acquire(backend, "s", stale_after_s=30)
    started = time.monotonic()
    taken = acquire(backend, "s", wait=True, poll_s=0.1, stale_after_s=1)  # ...by our own clock
    assert taken.generation == 7 and time.monotonic() - started >= 1
    # the stalled holder, should it wake up, finds it lost the lease before writing
    stalled = leases.Lease(backend, "s", Holder(generation=6, host="elsewhere", pid=1, since="x"), 3600)
    with pytest.raises(LeaseLost, match="taken over"):
        stalled.check()
    stalled._stop.set()
    taken.release()


def test_two_drivers_at_once(tmp_path, tiny_llama):
    spec = {
        "name": "two",
        "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [{"name": "baseline"}, {"name": "rtn"}],
        "bits": [4], "group_sizes": [32],
        # a few seconds per cell: the second driver starts while the first one runs
        "datasets": [{"name": "docs", "task": "perplexity", "path": "builtin:pydoc-topics",
                      "limit": 300, "seq_len": 128, "batch_size": 8}],
        "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0},
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "r"
    env = offline_env()
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results", str(results),
               "--no-progress"]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        backend = Store(results).leases()
        deadline = time.monotonic() + 120
        while backend.current("two") is None:
            assert time.monotonic() < deadline and first.poll() is None, "the first driver took no lease"
            time.sleep(0.2)
        second = qsweep("run", str(path), "--results", str(results), "--no-progress", cwd=tmp_path)
        assert first.poll() is None, "the first driver ended before the second one started"
        assert second.returncode == 3, second.stdout + second.stderr[-2000:]
        assert f"held by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        waiting = qsweep("run", str(path), "--results", str(results), "--no-progress", "--wait", cwd=tmp_path)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert "ran 2 cells" in out
    assert waiting.returncode == 0, waiting.stderr[-3000:]
    assert "ran 0 cells" in waiting.stdout  # it waited for the first driver, then found it all done
    rows = connect(str(results)).execute("select status, attempts, write_generation from cells").fetchall()
    assert rows == [("ok", 1, 1), ("ok", 1, 1)]  # each cell ran once, by the first driver


# 5. Schema evolution ----------------------------------------------------------------------

def test_rows_written_by_schema_1_are_read_and_count_as_done(tmp_path):
    from orchestrator.cells import expand
    from orchestrator.driver import make_plan
    from orchestrator.schema import SCHEMA_VERSION
    from orchestrator.spec import load_spec

    store = Store(tmp_path)
    (tmp_path / "fixture" / "compacted").mkdir(parents=True)
    shutil.copy(FIXTURES / "rows_schema_v1.parquet", tmp_path / "fixture" / "compacted" / "part-v1.parquet")
    rows = {r["method"]: r for r in store.read("fixture").to_pylist()}
    assert set(rows) == {"baseline", "rtn"} and SCHEMA_VERSION > 1
    assert {r["schema_version"] for r in rows.values()} == {1}
    assert rows["rtn"]["write_generation"] is None and rows["rtn"]["checked_on"] is None
    assert rows["rtn"]["primary_value"] == pytest.approx(296.26, abs=0.01)
    # the cells of the spec that wrote it still hash to those ids: nothing runs again
    spec = load_spec(str(FIXTURES / "rows_schema_v1.yaml"))
    assert {c.cell_id for c in expand(spec)} == {r["cell_id"] for r in rows.values()}
    plan = make_plan(spec, store, machine=False)
    assert plan.pending == [] and len(plan.done) == 2
    con = connect(str(tmp_path))
    assert con.execute("select count(*) from cells where status = 'ok'").fetchone() == (2,)


def test_a_renamed_column_is_mapped_for_older_rows(tmp_path, monkeypatch):

    from orchestrator import schema

    old = pq.read_table(FIXTURES / "rows_schema_v1.parquet")
    legacy = old.rename_columns(["peak_rss" if n == "peak_rss_bytes" else n for n in old.column_names])
    (tmp_path / "fixture" / "cells").mkdir(parents=True)
    pq.write_table(legacy, tmp_path / "fixture" / "cells" / "old.parquet")
    monkeypatch.setattr(schema, "RENAMED", {"peak_rss": "peak_rss_bytes"})
    from orchestrator import store as store_module

    monkeypatch.setattr(store_module, "RENAMED", {"peak_rss": "peak_rss_bytes"})
    read = Store(tmp_path).read("fixture", columns=["peak_rss_bytes"])
    assert read.column("peak_rss_bytes").to_pylist() == old.column("peak_rss_bytes").to_pylist()
    assert all(v is not None and v > 0 for v in read.column("peak_rss_bytes").to_pylist())
    assert read.schema.field("peak_rss_bytes").type == schema.SCHEMA.field("peak_rss_bytes").type


# 7. The artifact cache cannot fail a group ----------------------------------------------------

def test_artifact_cache_put_failures_are_logged_not_raised(tmp_path, caplog):
    import torch

    from tasks.artifacts import ArtifactCache
    from tasks.quantize.base import QuantReport

    cache = ArtifactCache(tmp_path / "cache", cap_bytes=10**9)
    report = QuantReport(layers=[], weight_format="fake-quant", kernel="dequantized")
    model = torch.nn.Linear(4, 4)
    model.unpicklable = lambda: None  # torch.save cannot pickle a lambda
    assert cache.put("g1", model, report, {}, "cpu") is False
    assert "not stored" in caplog.text
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no staging folder left behind

    good = torch.nn.Linear(4, 4)
    assert cache.put("g2", good, report, {"engine": None}, "cpu") is True
    assert (tmp_path / "cache" / "g2-cpu").is_dir()  # the device type is part of the key
    assert cache.put("g2", good, report, {}, "cpu") is False  # published already: no error
    loaded = cache.get("g2", "cpu")
    assert torch.equal(loaded.model.weight, good.weight) and loaded.model.weight.device.type == "cpu"
    assert cache.get("g2", "cuda:1") is None  # an entry of another device type is not this one


def test_lease_files_are_json_naming_the_holder(tmp_path):
    backend = Store(tmp_path).leases()
    lease = acquire(backend, "s")
    data = json.loads((tmp_path / "s" / "leases" / leases.lease_name(lease.generation)).read_text())
    assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
    assert dt.datetime.fromisoformat(data["since"]).tzinfo is not None
    stamped = lease.stamp([{"cell_id": "a"}, {"cell_id": "b"}])
    assert [(r["write_generation"], r["write_seq"]) for r in stamped] == [(1, 0), (1, 1)]
    lease.release()
    assert json.loads((tmp_path / "s" / "leases" / leases.lease_name(1)).read_text())["released"] is True


# 2. Preflight judges what it can see ---------------------------------------------------------

def test_machine_verdicts_use_the_workers_facts():
    from orchestrator.cells import expand
    from orchestrator.preflight import ModelFacts, machine_verdict
    from orchestrator.spec import parse_spec
    from tasks.locations import machine_facts

    spec = parse_spec({"name": "w", "models": [{"name": "m", "path": "/models/m", "dtype": "bfloat16"}],
                       "methods": [{"name": "rtn"}], "bits": [4], "group_sizes": [64],
                       "datasets": [{"name": "d", "task": "perplexity", "path": "/data/d.txt"}]})
    (cell,) = expand(spec)
    here = machine_facts(["/models/m", "/data/d.txt"])
    assert here["paths"] == {"/models/m": None, "/data/d.txt": None}
    assert here["gpu_memory_bytes"] is None  # no GPU given to this process
    seen = {"host": "gpu-node-7", "memory_bytes": 2**40, "gpu_memory_bytes": None, "gpu_name": None,
            "paths": {"/models/m": "dir", "/data/d.txt": "file"}, "models": {}}
    facts = ModelFacts(widths={"hidden_size": 4096, "intermediate_size": 14336}, params=8_000_000_000)
    assert not machine_verdict(cell, seen, facts).skip
    # an 8B model in bfloat16 on a 16 GB GPU: its quantized copy alone (+10%) does not fit, skipped
    # naming the GPU (the base model leaves the GPU while the copy is made: 24 GB would do)
    assert not machine_verdict(cell, dict(seen, gpu_memory_bytes=24 * 2**30, gpu_name="NVIDIA L4"), facts).skip
    small_gpu = dict(seen, gpu_memory_bytes=16 * 2**30, gpu_name="Tesla T4")
    verdict = machine_verdict(cell, small_gpu, facts)
    assert verdict.skip and verdict.error_class == "oom" and verdict.where == "worker gpu-node-7"
    assert "worker gpu-node-7's GPU (Tesla T4) has 16.0 GiB" in verdict.reason
    assert not machine_verdict(cell, dict(seen, gpu_memory_bytes=80 * 2**30), facts).skip
    missing = machine_verdict(cell, dict(seen, paths={"/models/m": "dir", "/data/d.txt": None}), facts)
    assert missing.skip and "dataset file /data/d.txt does not exist (checked on worker gpu-node-7)" in missing.reason


# Accumulated studies (issue 22.3): a finished cell is reused across sweeps of one store ---------

def test_a_second_sweep_runs_only_its_new_cells(tmp_path, tiny_llama, text_file):
    results = tmp_path / "r"
    first = tmp_path / "first.yaml"
    write_tiny_spec(first, "first", tiny_llama, text_file)  # baseline + rtn 4-bit g32
    done = qsweep("run", str(first), "--results", str(results), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0 and "ran 2 cells" in done.stdout, done.stderr[-3000:]
    second = tmp_path / "second.yaml"
    spec = yaml.safe_load(first.read_text()) | {"name": "second", "bits": [4, 8]}  # one new cell
    second.write_text(yaml.safe_dump(spec))
    plan = qsweep("plan", str(second), "--results", str(results), cwd=tmp_path)
    assert "3 cells in 3 quantization groups; 2 done (2 by other sweeps of the store, reused)" in plan.stdout
    again = qsweep("run", str(second), "--results", str(results), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ran 1 cells" in again.stdout and "reused from other sweeps: 2" in again.stdout
    con = connect(str(results), "second")
    rows = con.execute("select method, bits, status, reused_from from cells order by method, bits").fetchall()
    assert [(m, b, s) for m, b, s, _ in rows] == [("baseline", None, "ok"), ("rtn", 4, "ok"), ("rtn", 8, "ok")]
    assert rows[0][3].startswith("first (run ") and rows[1][3].startswith("first (run ") and rows[2][3] is None
    first_values = dict(connect(str(results), "first").execute(
        "select cell_id, primary_value from cells").fetchall())
    for cell_id, value in con.execute("select cell_id, primary_value from cells where reused_from is not null").fetchall():
        assert first_values[cell_id] == value  # the same result, not a recomputation
    # every view spans the store's sweeps; --isolate runs a sweep's own cells
    assert connect(str(results)).execute("select count(distinct cell_id) from cells").fetchone() == (3,)
    isolated = tmp_path / "isolated.yaml"
    isolated.write_text(yaml.safe_dump(spec | {"name": "isolated"}))
    alone = qsweep("run", str(isolated), "--results", str(results), "--no-progress", "--isolate", cwd=tmp_path)
    assert alone.returncode == 0 and "ran 3 cells" in alone.stdout, alone.stderr[-3000:]
