from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from test_store import row

from analysis.views import connect
from orchestrator.store import Store


def raw_count(results) -> int:
    return sum(pq.read_metadata(f).num_rows for f in Store(results).files())


def test_compact_merges_and_keeps_newest(tmp_path):
    store = Store(tmp_path)
    store.write_rows([row(f"c{i}", minutes=i) for i in range(20) if i != 3])
    store.write_rows([row("c3", status="failed", minutes=1), row("c3", status="timeout", minutes=100)])
    assert len(store.files("s")) == 21  # a failed and a timeout row of c3: one file each
    assert store.compact("s") == (21, 1)
    assert len(store.files("s")) == 1 and raw_count(tmp_path) == 20
    con = connect(str(tmp_path))
    assert con.execute("select count(*) from cells").fetchone() == (20,)
    assert con.execute("select status from cells where cell_id='c3'").fetchone() == ("timeout",)
    # New cells after a compaction, and a second compaction that folds the old part in; an ok
    # row outranks the failures, and a failure written after it does not replace it.
    store.write_rows([row("c3", status="ok", minutes=200), row("c99", minutes=200)])
    store.write_rows([row("c3", status="failed", minutes=300)])
    assert store.compact("s") == (4, 1)
    assert raw_count(tmp_path) == 21
    assert connect(str(tmp_path)).execute("select status from cells where cell_id='c3'").fetchone() == ("ok",)


def test_compaction_killed_after_rename_doubles_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write_rows([row(f"c{i}", minutes=i) for i in range(5)])

    def killed(path):
        raise KeyboardInterrupt("killed between the rename and the deletes")

    monkeypatch.setattr(os, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        store.compact("s")
    monkeypatch.undo()
    assert raw_count(tmp_path) == 10  # on disk twice, for a moment ...
    assert connect(str(tmp_path)).execute("select count(*) from cells").fetchone() == (5,)  # ... read once
    assert store.compact("s") == (5, 0) and raw_count(tmp_path) == 5  # the part had them: files go


def test_compaction_killed_before_rename_loses_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write_rows([row(f"c{i}", minutes=i) for i in range(5)])

    def killed(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.compact("s")
    monkeypatch.undo()
    assert raw_count(tmp_path) == 5
    assert connect(str(tmp_path)).execute("select count(*) from cells").fetchone() == (5,)


def test_a_cell_rewritten_during_compaction_is_kept(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write_rows([row("a", status="failed", minutes=0), row("b", minutes=0)])
    real_write = pq.write_table

    def write_then_rewrite(table, where, *args, **kwargs):
        real_write(table, where, *args, **kwargs)
        if table.num_rows == 2:  # the compacted part: a writer replaces a's file meanwhile
            monkeypatch.setattr(pq, "write_table", real_write)
            store.write_rows([row("a", status="ok", minutes=5)])

    monkeypatch.setattr(pq, "write_table", write_then_rewrite)
    store.compact("s")
    assert connect(str(tmp_path)).execute("select status from cells where cell_id='a'").fetchone() == ("ok",)


# Incremental compaction (issue 22.2) ------------------------------------------------------------

def part_inodes(results) -> dict[str, int]:
    return {f: os.stat(f).st_ino for f in Store(results).files("s") if "/compacted/" in f}


def test_compaction_leaves_earlier_parts_alone(tmp_path):
    store = Store(tmp_path)
    store.write_rows([row(f"a{i}", minutes=i) for i in range(5)])
    assert store.compact("s") == (5, 1)
    first = part_inodes(tmp_path)
    store.write_rows([row(f"b{i}", minutes=10 + i) for i in range(3)])
    assert store.compact("s") == (3, 1)  # the new cells only
    after = part_inodes(tmp_path)
    assert len(after) == 2 and all(after.get(path) == inode for path, inode in first.items())
    assert raw_count(tmp_path) == 8
    assert connect(str(tmp_path)).execute("select count(*) from cells").fetchone() == (8,)


def test_a_cell_run_again_rewrites_only_the_part_that_held_it(tmp_path):
    store = Store(tmp_path)
    store.write_rows([row("a", status="failed", minutes=0), row("b", minutes=1)])
    store.compact("s")
    store.write_rows([row(f"c{i}", minutes=2) for i in range(3)])
    store.compact("s")
    (holder,) = [p for p, _ in part_inodes(tmp_path).items()
                 if "a" in pq.read_table(p, columns=["cell_id"]).column("cell_id").to_pylist()]
    other = {p: i for p, i in part_inodes(tmp_path).items() if p != holder}
    store.write_rows([row("a", minutes=5)])  # a's retry, ok now
    assert store.compact("s") == (2, 1)  # a's file and the part with its failed row
    now = part_inodes(tmp_path)
    assert holder not in now and all(now.get(p) == i for p, i in other.items())
    assert raw_count(tmp_path) == 5  # no stale row on disk
    assert connect(str(tmp_path)).execute("select status from cells where cell_id = 'a'").fetchone() == ("ok",)
    # a failure after the ok row is dropped, and the part that holds the ok row is left alone
    before = part_inodes(tmp_path)
    store.write_rows([row("a", status="failed", minutes=9)])
    assert store.compact("s") == (1, 0) and part_inodes(tmp_path) == before and raw_count(tmp_path) == 5


def test_small_parts_are_merged_once_they_pile_up(tmp_path):
    from orchestrator.store import MERGE_PARTS

    store = Store(tmp_path)
    for batch in range(MERGE_PARTS):
        store.write_rows([row(f"c{batch}-{i}", minutes=batch) for i in range(2)])
        store.compact("s", rows_per_file=100)
    assert len(part_inodes(tmp_path)) == MERGE_PARTS
    store.write_rows([row("last", minutes=99)])
    assert store.compact("s", rows_per_file=100) == (MERGE_PARTS + 1, 1)  # eight small parts and the new file
    assert len(part_inodes(tmp_path)) == 1 and raw_count(tmp_path) == 2 * MERGE_PARTS + 1
    # and --full merges everything whatever its size
    store.write_rows([row("more", minutes=100)])
    store.compact("s")
    assert store.compact("s", full=True) == (2, 1) and len(part_inodes(tmp_path)) == 1


def test_the_driver_compacts_while_the_sweep_runs(tmp_path, tiny_llama, text_file):
    import subprocess
    import sys

    from cluster_util import offline_env, write_tiny_spec

    spec = tmp_path / "spec.yaml"
    write_tiny_spec(spec, "s", tiny_llama, text_file)  # baseline and rtn: two groups, a row each
    results = tmp_path / "r"
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(results),
                          "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=offline_env(QSWEEP_COMPACT_EVERY_CELLS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    files = Store(results).files("s")
    # each row was folded into a part of its own as it landed; the final compaction had nothing new
    assert len(files) == 2 and all("/compacted/" in f for f in files), files
    assert raw_count(results) == 2
