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
    assert store.compact("s")[1] == 1 and raw_count(tmp_path) == 5


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
