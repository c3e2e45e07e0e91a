"""The results store: one Parquet file per finished cell, written atomically.

Layout: ``<results>/<sweep>/cells/<cell_id>[.<status>].parquet`` while running (see
``cell_file_name``), and
``<results>/<sweep>/compacted/part-*.parquet`` after ``compact``. A write goes to a hidden
temporary file in the same directory, is fsynced, then renamed over the final name, so a reader
(or a crash) never sees a partial file. Rewriting a cell replaces its file; where a cell has
rows in several files (between a compaction's rename and its deletes), readers keep one by
``schema.ROW_ORDER``: an ok row before any other, then the writer's sequence (the lease
generation of the driver that wrote it, then its counter), never the hosts' clocks.

Rows of earlier schema versions are read as the current schema (``schema.upgrade_table``:
missing columns null, renamed ones mapped); the driver holds the sweep's lease
(``orchestrator.lease``) while it writes or compacts.

``results`` is a local or shared-filesystem path, or a URI that ``pyarrow.fs`` understands
(``s3://bucket/prefix``, ``gs://``, ``abfs://``, ``hdfs://``; for S3-compatible servers add
``?endpoint_override=host:port&scheme=http`` or set ``AWS_ENDPOINT_URL``), or, failing that,
one that ``fsspec`` understands. On an object store a single PUT is atomic: the file is
serialized in memory and PUT to its final key, so no temporary key is needed; on other
filesystems it is written to a temporary name and moved.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.lease import LocalLeases, RemoteLeases
from orchestrator.schema import RENAMED, ROW_ORDER, SCHEMA, to_table, upgrade_table

TMP_PREFIX = ".tmp-"
# Filesystems where one PUT creates the whole object or nothing (pyarrow's own, and fsspec's
# seen through pyarrow as "py::fsspec+<protocol>").
OBJECT_STORES = ("s3", "gcs", "gs", "abfs", "az")


class StoreError(Exception):
    pass


class Store:
    """The store at ``results``. ``root`` is a ``Path`` for a local path; for a URI it is the
    URI without its query and credentials (safe to print), and ``fs``/``base`` address it."""

    def __init__(self, results: str | Path):
        results = str(results)
        self.fs: pafs.FileSystem | None = None
        if results.startswith("file://"):
            results = results.removeprefix("file://")
        self._uri = results
        if "://" in results:
            self.fs, self.base = _filesystem(results)
            parts = urlsplit(results)
            self.root = f"{parts.scheme}://{parts.hostname or ''}{parts.path}".rstrip("/")
        else:
            self.root = Path(results).expanduser().resolve()

    def cells_dir(self, sweep: str) -> Path | str:
        if self.fs is not None:
            return f"{self.root}/{sweep}/cells"
        return self.root / sweep / "cells"

    def check_writable(self, sweep: str) -> None:
        """Fail fast, before any cell runs, when results cannot be written here."""
        if self.fs is not None:
            probe = f"{self.base}/{sweep}/cells/{TMP_PREFIX}probe-{uuid.uuid4().hex}"
            try:
                _put(self.fs, probe, b"\0" * 4096)
                self.fs.delete_file(probe)
            except OSError as exc:
                raise StoreError(
                    f"results location {self.cells_dir(sweep)} is not writable ({exc}); check "
                    "the bucket exists and the credentials (AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or ?endpoint_override=host:port "
                    "for S3-compatible servers), or pass another --results") from None
            return
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

    def leases(self) -> LocalLeases | RemoteLeases:
        """Where this store keeps its sweeps' leases (``orchestrator.lease``)."""
        if self.fs is not None:
            return RemoteLeases(self.fs, self.base, self._uri)
        return LocalLeases(self.root)

    def write_rows(self, rows: list[dict[str, Any]]) -> list[Path]:
        """Write each row to its cell's file atomically; returns the final paths."""
        return [self._write_one(row) for row in rows]

    def _write_one(self, row: dict[str, Any]) -> Path | str:
        name = cell_file_name(row)
        if self.fs is not None:
            path = f"{self.base}/{row['sweep']}/cells/{name}"
            _put(self.fs, path, _parquet_bytes(to_table([row])))
            return path
        directory = self.cells_dir(row["sweep"])
        return _atomic_write(to_table([row]), directory / name)

    def files(self, sweep: str | None = None) -> list[str]:
        """Finished files, per-cell and compacted (temporary files are never listed); paths
        on ``fs`` for a URI store. Per-cell files are listed before compacted ones, so a reader
        racing a compaction (which writes its part before deleting sources) misses no row."""
        if self.fs is not None:
            return [info.path for info in self._listing(sweep)]
        prefix = sweep or "*"
        paths = list(self.root.glob(f"{prefix}/cells/*.parquet")) + list(self.root.glob(f"{prefix}/compacted/*.parquet"))
        return sorted(str(p) for p in paths if not p.name.startswith(TMP_PREFIX))

    def compact(self, sweep: str, rows_per_file: int = 250_000, full: bool = False) -> tuple[int, int]:
        """Fold the sweep's per-cell files into a new compacted part; returns (files in, files out).

        Incremental: parts already compacted are not rewritten, except a part that holds a row
        the new rows supersede (a cell run again: the part is rewritten without it, so no stale
        row stays on disk) and, once ``MERGE_PARTS`` small parts of one size class have piled up,
        those (merged into one: ``mergeable``). New rows that lose to a row already in a
        part (a failure after an ok row, a copy left by a killed compaction) are dropped.
        ``full`` merges everything into as few parts as ``rows_per_file`` allows.

        Safe to kill at any point: new parts appear by atomic rename (a PUT on object stores)
        before any source is deleted, and readers de-duplicate in between. A source rewritten
        meanwhile is left in place, so a concurrent writer's row is never deleted.
        """
        if self.fs is not None:
            return self._compact_remote(sweep, rows_per_file, full)
        self._remove_stale_tmp(sweep)
        sources = self.files(sweep)
        cell_files = [p for p in sources if "/cells/" in p]
        parts = [p for p in sources if "/compacted/" in p]
        before = {path: os.stat(path).st_ino for path in sources}
        merge, table = self._merge_plan(cell_files, parts, rows_per_file, full)
        if merge is None:
            return len(sources), len(sources)
        directory = self.root / sweep / "compacted"
        outputs = []
        for start in range(0, table.num_rows, rows_per_file):  # none when every row is already in a part
            part = directory / f"part-{uuid.uuid4().hex}.parquet"
            outputs.append(_atomic_write(table.slice(start, rows_per_file), part))
        for path in merge:
            try:
                if os.stat(path).st_ino == before[path]:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        return len(merge), len(outputs)

    def _merge_plan(self, cell_files: list[str], parts: list[str], rows_per_file: int,
                    full: bool) -> tuple[list[str] | None, pa.Table | None]:
        """The files a compaction merges and the rows of the part(s) it writes; (None, None)
        when there is nothing to do. See ``compact``."""
        if full:
            merge = cell_files + parts
            if len(merge) <= 1:
                return None, None
            return merge, _newest(_read_files(merge, self.fs)).sort_by([("cell_id", "ascending")])
        sizes = {p: pq.read_metadata(p, filesystem=self.fs).num_rows for p in parts}
        folded = mergeable(sizes, rows_per_file)
        if not cell_files and not folded:
            return None, None
        kept = [p for p in parts if p not in folded]
        new = _newest(_read_files(cell_files + folded, self.fs))
        dirty: list[str] = []
        if kept and new.num_rows:
            winners, on_disk = _winners(new, kept, self.fs)
            dirty = sorted({path for path, wins in winners.items() if path != NEW and not wins})
            if dirty:  # fold those parts in too, and rank again
                new = _newest(pa.concat_tables([new, _read_files(dirty, self.fs)], promote_options="default"))
            # a cell whose row is in a part that stays has its first row there: drop its copies here
            stay = {cell for cell, path in on_disk if path not in dirty}
            if stay:
                new = new.filter(pc.invert(pc.is_in(new.column("cell_id"), pa.array(sorted(stay)))))
        return cell_files + folded + dirty, new.sort_by([("cell_id", "ascending")])

    def _compact_remote(self, sweep: str, rows_per_file: int, full: bool) -> tuple[int, int]:
        """``compact`` on a URI store: parts are PUT (atomic) before any source is deleted; a
        source whose size changed since the listing, or whose row now carries another write
        sequence, was rewritten meanwhile and is kept (modification times, at 1 s resolution
        on many stores, are not compared)."""
        infos = self._listing(sweep, include_tmp=True)
        stale = time.time() - 3600
        for info in infos:
            if _is_tmp(info.path) and info.mtime is not None and info.mtime.timestamp() < stale:
                self._delete(info.path)
        sources = [info for info in infos if not _is_tmp(info.path)]
        paths = [i.path for i in sources]
        read_as = _sequences([p for p in paths if "/cells/" in p], self.fs) if paths else {}
        merge, table = self._merge_plan([p for p in paths if "/cells/" in p],
                                        [p for p in paths if "/compacted/" in p], rows_per_file, full)
        if merge is None:
            return len(sources), len(sources)
        outputs = []
        for start in range(0, table.num_rows, rows_per_file):  # none when every row is already in a part
            part = f"{self.base}/{sweep}/compacted/part-{uuid.uuid4().hex}.parquet"
            _put(self.fs, part, _parquet_bytes(table.slice(start, rows_per_file)))
            outputs.append(part)
        size = {info.path: info.size for info in sources}
        unchanged = [path for path, now in zip(merge, self.fs.get_file_info(merge))
                     if now.type == pafs.FileType.File and now.size == size[path]]
        cell_files = [path for path in unchanged if "/cells/" in path]
        read_now = _sequences(cell_files, self.fs) if cell_files else {}
        for path in unchanged:
            if "/cells/" in path and (path not in read_as or read_now.get(path) != read_as[path]):
                continue  # rewritten with a row of another write sequence but the same size
            self._delete(path)
        return len(merge), len(outputs)

    def _delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def _listing(self, sweep: str | None, include_tmp: bool = False) -> list[pafs.FileInfo]:
        if sweep is None:
            top = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
            sweeps = sorted(i.base_name for i in top if i.type == pafs.FileType.Directory)
        else:
            sweeps = [sweep]
        infos = []
        for name in sweeps:
            for kind in ("cells", "compacted"):
                selector = pafs.FileSelector(f"{self.base}/{name}/{kind}", allow_not_found=True)
                found = self.fs.get_file_info(selector)
                infos += sorted((i for i in found if i.type == pafs.FileType.File
                                 and i.path.endswith(".parquet")
                                 and (include_tmp or not _is_tmp(i.path))), key=lambda i: i.path)
        return infos

    def _remove_stale_tmp(self, sweep: str, older_than_s: float = 3600) -> None:
        """Temporary files a killed writer left behind (never read; removed after an hour)."""
        for directory in (self.root / sweep / "cells", self.root / sweep / "compacted"):
            for path in directory.glob(f"{TMP_PREFIX}*"):
                try:
                    if time.time() - path.stat().st_mtime > older_than_s:
                        path.unlink()
                except FileNotFoundError:
                    pass

    def dataset(self, sweep: str | None = None) -> pads.Dataset:
        """Every row of the store (or one sweep) as the current schema, lazily where no column
        was renamed since the oldest schema."""
        return _dataset(self.files(sweep), self.fs)

    def read_cells(self, cell_ids: set[str], sweep: str | None = None) -> pa.Table:
        """The rows of these cells (one per cell, ``ROW_ORDER``), every column."""
        if not cell_ids or not self.files(sweep):
            return SCHEMA.empty_table()
        table = self.dataset(sweep).to_table(filter=pc.field("cell_id").isin(sorted(cell_ids)))
        return _newest(table)

    def read(self, sweep: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """All rows, one per cell_id (``ROW_ORDER``)."""
        wanted = columns and sorted(set(columns) | set(RANK_COLUMNS))
        return _newest(self.dataset(sweep).to_table(columns=wanted))

    # -- allocations (analysis.allocate): predictions beside the rows they predict -------------
    def write_allocation(self, allocation_id: str, table: pa.Table) -> Path | str:
        """Record an allocation's predictions (``ALLOCATION_SCHEMA``: one row per cell of the
        spec it wrote) as ``<store>/.allocations/<allocation_id>.parquet``; writing the same
        allocation again replaces it."""
        table = table.cast(ALLOCATION_SCHEMA)
        if self.fs is not None:
            path = f"{self.base}/{ALLOCATIONS}/{allocation_id}.parquet"
            _put(self.fs, path, _parquet_bytes(table))
            return path
        return _atomic_write(table, self.root / ALLOCATIONS / f"{allocation_id}.parquet")

    def allocations(self) -> pa.Table:
        """Every recorded allocation's predictions (an empty table when there are none)."""
        if self.fs is not None:
            infos = self.fs.get_file_info(pafs.FileSelector(f"{self.base}/{ALLOCATIONS}", allow_not_found=True))
            paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                           and not _is_tmp(i.path))
        else:
            paths = sorted(str(p) for p in (self.root / ALLOCATIONS).glob("*.parquet")
                           if not p.name.startswith(TMP_PREFIX))
        if not paths:
            return ALLOCATION_SCHEMA.empty_table()
        return pads.dataset(paths, schema=ALLOCATION_SCHEMA, format="parquet", filesystem=self.fs).to_table()


def cell_file_name(row: dict[str, Any]) -> str:
    """``<cell_id>.parquet`` for an ok row, ``<cell_id>.<status>.parquet`` for any other: a
    lesser row never replaces an ok row's file; readers rank the rows (``ROW_ORDER``) and
    compaction removes the losers."""
    status = row["status"]
    return f"{row['cell_id']}.parquet" if status == "ok" else f"{row['cell_id']}.{status}.parquet"


def _dataset(paths: list[str], fs: pafs.FileSystem | None) -> pads.Dataset:
    if not RENAMED:  # the current schema reads every older file: missing columns come back null
        return pads.dataset(paths, schema=SCHEMA, format="parquet", filesystem=fs)
    legacy = [pa.field(old, SCHEMA.field(new).type) for old, new in RENAMED.items()]
    raw = pads.dataset(paths, schema=pa.schema(list(SCHEMA) + legacy), format="parquet", filesystem=fs)
    return pads.dataset(upgrade_table(raw.to_table()))


def _read_files(paths: list[str], fs: pafs.FileSystem | None) -> pa.Table:
    return _dataset(paths, fs).to_table()


def _sequences(paths: list[str], fs: pafs.FileSystem | None) -> dict[str, list[tuple]]:
    """Per file, its rows' (cell_id, write_generation, write_seq) as they are now."""
    try:
        table = pads.dataset(paths, schema=SCHEMA, format="parquet", filesystem=fs).to_table(
            columns=["cell_id", "write_generation", "write_seq", "__filename"])
    except (OSError, pa.ArrowInvalid):
        return {}
    found: dict[str, list[tuple]] = {}
    for cell_id, generation, seq, path in zip(*(c.to_pylist() for c in table.columns)):
        found.setdefault(path, []).append((cell_id, generation, seq))
    return {path: sorted(rows) for path, rows in found.items()}


NEW = "<new>"  # the rows a compaction is folding in, beside the parts' files
# The columns ``_newest`` ranks a cell's rows by (``ROW_ORDER``; its status_ok comes from status).
RANK_COLUMNS = ("cell_id", "status", *(key for key, _ in ROW_ORDER if key != "status_ok"))
ALLOCATIONS = ".allocations"  # beside the sweeps; a sweep's files are under <sweep>/cells|compacted
ALLOCATION_SCHEMA = pa.schema([
    ("allocation_id", pa.string()),  # hash of the allocation's inputs
    ("cell_id", pa.string()),  # a cell of the spec the allocation wrote
    ("predicted_kl", pa.float64()),  # the sum of the chosen options' unit KL on the cell's dataset
    ("allocation", pa.string()),  # JSON: study sweep, budget, solver, chosen option per unit
])
MERGE_PARTS = 8  # small compacted parts of one size class that, piled up, are merged into one


def tier(rows: int) -> int:
    """Size class of a part: parts of one class are within a factor ``MERGE_PARTS`` of each other."""
    return int(math.log(max(rows, 1), MERGE_PARTS))


def mergeable(sizes: dict[str, int], rows_per_file: int) -> list[str]:
    """The parts (path -> rows) a compaction merges: those of the smallest size class that
    holds ``MERGE_PARTS`` parts under half of ``rows_per_file`` (size-tiered, so a row is
    rewritten about log_8(rows) times over a store's life, not at every compaction)."""
    tiers: dict[int, list[str]] = {}
    for path, rows in sorted(sizes.items()):
        if rows < rows_per_file // 2:
            tiers.setdefault(tier(rows), []).append(path)
    for _, paths in sorted(tiers.items()):
        if len(paths) >= MERGE_PARTS:
            return paths
    return []


def _winners(new: pa.Table, parts: list[str],
             fs: pafs.FileSystem | None) -> tuple[dict[str, bool], list[tuple[str, str]]]:
    """For ``new`` rows (one per cell) against the rows of the same cells in compacted
    ``parts``: per source (``NEW`` or a part's path), whether every such row it holds is its
    cell's first by ``ROW_ORDER`` (a tie goes to the part: its copy stays where it is); and
    those rows' (cell_id, path) pairs. Reads only the ranking columns of the parts, and only the
    rows of ``new``'s cells: a compaction during a sweep costs the new rows, not the store."""
    keys = list(RANK_COLUMNS)
    on_disk = pads.dataset(parts, schema=SCHEMA, format="parquet", filesystem=fs).to_table(
        columns=keys + ["__filename"], filter=pc.field("cell_id").isin(new.column("cell_id")))
    here = new.select(keys)
    both = pa.concat_tables([
        here.append_column("source", pa.array([NEW] * here.num_rows)).append_column(
            "from_new", pa.array(np.ones(here.num_rows, dtype=np.int8))),
        on_disk.drop_columns(["__filename"]).append_column("source", on_disk.column("__filename")).append_column(
            "from_new", pa.array(np.zeros(on_disk.num_rows, dtype=np.int8)))])
    ranked = _newest(both, tiebreak=[("from_new", "ascending")])
    winning = set(zip(ranked.column("cell_id").to_pylist(), ranked.column("source").to_pylist()))
    result: dict[str, bool] = {}
    for cell_id, source in zip(both.column("cell_id").to_pylist(), both.column("source").to_pylist()):
        result[source] = result.get(source, True) and (cell_id, source) in winning
    return result, list(zip(on_disk.column("cell_id").to_pylist(), on_disk.column("__filename").to_pylist()))


def _newest(table: pa.Table, tiebreak: list[tuple[str, str]] | None = None) -> pa.Table:
    """One row per cell_id, the first by ``ROW_ORDER``."""
    if table.num_rows == 0:
        return table
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).cast(pa.int8())
    keyed = table.append_column("status_ok", ok)
    keys = [(key, order) for key, order in ROW_ORDER if key in keyed.column_names] + (tiebreak or [])
    try:  # pyarrow >= 25: null placement per key
        order = pc.sort_indices(keyed, [(key, direction, "at_end") for key, direction in keys])
    except (TypeError, ValueError, pa.ArrowInvalid):
        order = pc.sort_indices(keyed, keys, null_placement="at_end")
    table = table.take(order)
    seen, keep = set(), []
    for i, cell_id in enumerate(table.column("cell_id").to_pylist()):
        if cell_id not in seen:
            seen.add(cell_id)
            keep.append(i)
    return table.take(keep)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``pyarrow.fs`` for the URI, else ``fsspec`` (wrapped for pyarrow) where installed."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError) as arrow_error:
        try:
            import fsspec.core
        except ImportError:
            raise StoreError(f"--results {urlsplit(uri).scheme}://...: {arrow_error}; install "
                             "fsspec and the package for this scheme, or use s3://, gs://, "
                             "abfs://, hdfs:// or a path") from None
        try:
            fsspec_fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"--results {urlsplit(uri).scheme}://...: neither pyarrow.fs nor "
                             f"fsspec can open it ({exc})") from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    except OSError as exc:
        raise StoreError(f"--results {urlsplit(uri).scheme}://...: cannot open ({exc})") from None
    return fs, path.rstrip("/")


def _is_tmp(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(TMP_PREFIX)


def _parquet_bytes(table: pa.Table) -> pa.Buffer:
    """Serialize first: an exception mid-write must never close (and so publish) a stream."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue()


def _put(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """Publish ``data`` at ``path`` whole or not at all."""
    protocol = fs.type_name.removeprefix("py::fsspec+")
    if any(name in protocol for name in OBJECT_STORES):
        with fs.open_output_stream(path) as out:  # one PUT (or a multipart upload) is atomic
            out.write(data)
        return
    directory, name = path.rsplit("/", 1)
    fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/{TMP_PREFIX}{name}-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


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
