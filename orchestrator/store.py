"""The results store: one Parquet file per finished cell, written atomically.

Layout: ``<results>/<sweep>/cells/<cell_id>.parquet``. A write goes to a hidden temporary
file in the same directory, is fsynced, then renamed over the final name, so a reader (or a
crash) never sees a partial file. Rewriting a cell replaces its file: newest wins.
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
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"{row['cell_id']}.parquet"
        tmp = directory / f"{TMP_PREFIX}{row['cell_id']}-{uuid.uuid4().hex}.parquet"
        table = to_table([row])
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

    def files(self, sweep: str | None = None) -> list[str]:
        """Finished cell files (temporary files are never listed)."""
        pattern = f"{sweep}/cells/*.parquet" if sweep else "*/cells/*.parquet"
        return sorted(str(p) for p in self.root.glob(pattern) if not p.name.startswith(TMP_PREFIX))

    def dataset(self, sweep: str | None = None) -> pads.Dataset:
        return pads.dataset(self.files(sweep), schema=SCHEMA, format="parquet")

    def read(self, sweep: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """All rows, newest per cell_id."""
        table = self.dataset(sweep).to_table(columns=columns and sorted(set(columns) | {"cell_id", "finished_at"}))
        if table.num_rows == 0:
            return table
        order = pc.sort_indices(table, [("finished_at", "descending")])
        table = table.take(order)
        seen, keep = set(), []
        for i, cell_id in enumerate(table.column("cell_id").to_pylist()):
            if cell_id not in seen:
                seen.add(cell_id)
                keep.append(i)
        return table.take(keep)
