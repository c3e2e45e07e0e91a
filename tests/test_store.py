from __future__ import annotations

import datetime as dt
import os

import pytest

from analysis.views import connect
from orchestrator.store import Store, StoreError


def row(cell_id: str, status: str = "ok", minutes: int = 0, value: float = 1.0) -> dict:
    at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=minutes)
    return {"schema_version": 1, "sweep": "s", "cell_id": cell_id, "method": "baseline",
            "dataset": "d", "status": status, "primary_metric": "token_perplexity",
            "primary_value": value, "finished_at": at, "started_at": at,
            "metrics": [{"metric": "token_perplexity", "value": value, "stderr": 0.1, "n": 4,
                         "definition": "test"}]}


def test_write_and_query(tmp_path):
    store = Store(tmp_path)
    store.write_rows([row("a"), row("b", status="failed")])
    con = connect(str(tmp_path))
    assert con.execute("select cell_id, status from cells order by cell_id").fetchall() == [("a", "ok"), ("b", "failed")]
    assert con.execute("select cell_id, metric, value, n from metrics where cell_id='a'").fetchall() == [
        ("a", "token_perplexity", 1.0, 4)]


def test_crash_during_write_leaves_nothing_readable(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write_rows([row("a", value=1.0)])

    def crash(*args):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_rows([row("a", minutes=5, value=2.0)])
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / "s" / "cells").iterdir())
    assert files == ["a.parquet"]  # the temporary file is gone, the old row intact
    assert connect(str(tmp_path)).execute("select primary_value from cells").fetchall() == [(1.0,)]


def test_partial_temporary_file_is_never_read(tmp_path):
    store = Store(tmp_path)
    store.write_rows([row("a")])
    (tmp_path / "s" / "cells" / ".tmp-b-123.parquet").write_bytes(b"PAR1 half a file")
    assert connect(str(tmp_path)).execute("select count(*) from cells").fetchone() == (1,)


def test_newest_row_wins(tmp_path):
    store = Store(tmp_path)
    store.write_rows([row("a", status="failed", minutes=0)])
    store.write_rows([row("a", status="ok", minutes=1, value=3.0)])
    # A second file for the same cell (as compaction may leave for a moment): still one row.
    import pyarrow.parquet as pq

    from orchestrator.schema import to_table

    pq.write_table(to_table([row("a", status="failed", minutes=-10)]), tmp_path / "s" / "cells" / "old.parquet")
    con = connect(str(tmp_path))
    assert con.execute("select status, primary_value from cells").fetchall() == [("ok", 3.0)]
    assert store.read("s").num_rows == 1


def test_unwritable_location_fails_fast(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="is not writable"):
        Store(blocker / "results").check_writable("s")


def test_rows_must_match_schema(tmp_path):
    with pytest.raises(KeyError, match="not in the schema"):
        Store(tmp_path).write_rows([dict(row("a"), surprise=1)])
    with pytest.raises(ValueError, match="status"):
        Store(tmp_path).write_rows([row("a", status="great")])


def test_empty_store_has_views(tmp_path):
    con = connect(str(tmp_path))
    assert con.execute("select count(*) from cells").fetchone() == (0,)
    columns = {r[0] for r in con.execute("describe cells").fetchall()}
    assert {"sweep", "cell_id", "model", "method", "bits", "group_size", "dataset", "status",
            "error_class", "error_message", "weight_bytes", "bits_per_weight", "time_load_s",
            "time_quantize_s", "time_evaluate_s", "time_profile_s"} <= columns


def test_every_column_has_a_definition(tmp_path):
    from orchestrator.schema import COLUMNS

    rows = connect(str(tmp_path)).execute("select column_name, definition from columns").fetchall()
    assert len(rows) == len(COLUMNS) and all(len(doc) > 10 for _, doc in rows)
