"""The results store: one Parquet file per finished cell, written atomically.

Layout: ``<results>/<sweep>/cells/<cell_id>.parquet`` while running, and
``<results>/<sweep>/compacted/part-*.parquet`` after ``compact``. A write goes to a hidden
temporary file in the same directory, is fsynced, then renamed over the final name, so a reader
(or a crash) never sees a partial file. Rewriting a cell replaces its file; where a cell has
rows in several files (between a compaction's rename and its deletes), readers keep the newest
by ``finished_at``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from orchestrator.schema import SCHEMA, to_table

TMP_PREFIX = ".tmp-"


class StoreError(Exception):
    pass


class Store:
    def __init__(self, results: str | Path):
        results = str(results)
        if "://" in results:
            raise StoreError(f"--results {results}: object-store URIs are not supported yet; "
                             "use a local or shared-filesystem path")
        self.root = Path(results).expanduser().resolve()

    def cells_dir(self, sweep: str) -> Path:
        return self.root / sweep / "cells"

    def check_writable(self, sweep: str) -> None:
        """Fail fast, before any cell runs, when results cannot be written here."""
        directory = self.cells_dir(sweep)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f"{TMP_PREFIX}probe-{uuid.uuid4().hex}"
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"results location {directory} is not writable ({exc.strerror}); "
                             "pass --results DIR with a writable directory") from None

    def write_rows(self, rows: list[dict[str, Any]]) -> list[Path]:
        """Write each row to its cell's file atomically; returns the final paths."""
        return [self._write_one(row) for row in rows]

    def _write_one(self, row: dict[str, Any]) -> Path:
        directory = self.cells_dir(row["sweep"])
        return _atomic_write(to_table([row]), directory / f"{row['cell_id']}.parquet")

    def files(self, sweep: str | None = None) -> list[str]:
        """Finished files, per-cell and compacted (temporary files are never listed)."""
        prefix = sweep or "*"
        paths = list(self.root.glob(f"{prefix}/cells/*.parquet")) + list(self.root.glob(f"{prefix}/compacted/*.parquet"))
        return sorted(str(p) for p in paths if not p.name.startswith(TMP_PREFIX))

    def compact(self, sweep: str, rows_per_file: int = 250_000) -> tuple[int, int]:
        """Merge the sweep's files into few, newest row per cell; returns (files in, files out).

        Safe to kill at any point: new parts appear by atomic rename before any source is
        deleted, and readers de-duplicate in between. A source rewritten meanwhile (its inode
        changed) is left in place, so a concurrent writer's row is never deleted.
        """
        sources = self.files(sweep)
        self._remove_stale_tmp(sweep)
        if len(sources) <= 1:
            return len(sources), len(sources)
        before = {path: os.stat(path).st_ino for path in sources}
        table = _newest(pads.dataset(sources, schema=SCHEMA, format="parquet").to_table())
        table = table.sort_by([("cell_id", "ascending")])
        directory = self.root / sweep / "compacted"
        outputs = []
        for start in range(0, max(table.num_rows, 1), rows_per_file):
            part = directory / f"part-{uuid.uuid4().hex}.parquet"
            outputs.append(_atomic_write(table.slice(start, rows_per_file), part))
        for path in sources:
            try:
                if os.stat(path).st_ino == before[path]:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        return len(sources), len(outputs)

    def _remove_stale_tmp(self, sweep: str, older_than_s: float = 3600) -> None:
        """Temporary files a killed writer left behind (never read; removed after an hour)."""
        import time

        for directory in (self.root / sweep / "cells", self.root / sweep / "compacted"):
            for path in directory.glob(f"{TMP_PREFIX}*"):
                try:
                    if time.time() - path.stat().st_mtime > older_than_s:
                        path.unlink()
                except FileNotFoundError:
                    pass

    def dataset(self, sweep: str | None = None) -> pads.Dataset:
        return pads.dataset(self.files(sweep), schema=SCHEMA, format="parquet")

    def read(self, sweep: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """All rows, newest per cell_id."""
        wanted = columns and sorted(set(columns) | {"cell_id", "finished_at"})
        return _newest(self.dataset(sweep).to_table(columns=wanted))


def _newest(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    table = table.take(pc.sort_indices(table, [("finished_at", "descending")]))
    seen, keep = set(), []
    for i, cell_id in enumerate(table.column("cell_id").to_pylist()):
        if cell_id not in seen:
            seen.add(cell_id)
            keep.append(i)
    return table.take(keep)


def _atomic_write(table: pa.Table, final: Path) -> Path:
    """tmp in the same directory + fsync + rename + fsync of the directory."""
    directory = final.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{TMP_PREFIX}{final.stem}-{uuid.uuid4().hex}.parquet"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return final
