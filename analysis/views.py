"""DuckDB over the store: the views every query sees.

- ``cells``: one row per cell (its ok row if any, else its last written: ``schema.ROW_ORDER``), every column of the row
  schema except the nested ``metrics`` (see ``qsweep query "describe cells"``).
- ``columns``: every column of the row schema with its type and definition.
- ``metrics``: long table, one row per (cell, metric): sweep, cell_id, model, method, bits,
  group_size, dataset, metric, value, stderr, n, definition, ci95_low, ci95_high.
- ``layers``: one row per (cell, linear layer): what the method did to it — quantized or kept
  (reason), the group layout used (``4x128+64`` for a ragged fallback), relative weight error.
- ``examples``: long table, one row per (cell, example, metric): sweep, cell_id, model, method,
  method_params, bits, group_size, dataset, example_id, metric, value — join a quantized cell
  to its baseline on (model, dataset, example_id, metric) for paired comparisons.
- ``metric_directions``: each quality metric, whether higher is better, its per-example
  record and paired test (analysis.quality).
- ``baseline_deltas``, ``pareto``, ``table1``, ``sensitivity``: see analysis.derived for their columns.
- ``allocations``: what ``qsweep allocate`` predicted for the cells of the specs it wrote.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from analysis.derived import CONFIG_LABEL, DERIVED_VIEWS, OK_ROWS, RECORDS_BY_ROW, prepare, seal
from orchestrator.schema import COLUMNS, RENAMED, ROW_ORDER_SQL, SCHEMA
from orchestrator.store import Store

VIEWS = {
    "cells": """
        create or replace view cells as
        select * exclude (metrics, examples, layers) from latest_rows
    """,
    "metrics": """
        create or replace view metrics as
        select sweep, cell_id, model, method, bits, group_size, dataset,
               m.metric as metric, m.value as value, m.stderr as stderr, m.n as n,
               m.definition as definition, m.ci95_low as ci95_low, m.ci95_high as ci95_high
        from (select *, unnest(metrics) as m from latest_rows)
    """,
    "layers": """
        create or replace view layers as
        select sweep, cell_id, model, method, method_params, bits, group_size as requested_group_size,
               l.name as layer, l.in_features as in_features, l.out_features as out_features,
               l.quantized as quantized, l.group_layout as group_layout, l.fallback as fallback,
               l.relative_error as relative_error, l.reason as reason
        from (select *, unnest(layers) as l from latest_rows)
    """,
    "examples": """
        create or replace view examples as
        select sweep, cell_id, model, method, method_params, bits, group_size, dataset,
               e.example_id as example_id, e.metric as metric, e.value as value
        from (select *, unnest(examples) as e from latest_rows)
    """,
    **DERIVED_VIEWS,
}


def dicts(relation: duckdb.DuckDBPyConnection) -> list[dict]:
    """The rows of an executed query as dicts keyed by column name."""
    names = [d[0] for d in relation.description]
    return [dict(zip(names, row)) for row in relation.fetchall()]


def store_facts(con: duckdb.DuckDBPyConnection) -> int:
    """Small tables of what the whole store holds, found once per connection (its files are
    fixed when it connects) so that no query reads the store whole for them: the cells written
    more than once (``repeated_cells``: only those need ranking in ``latest_rows``) and the
    sweeps (``store_sweeps``), in one pass; then every ok baseline row (``baseline_rows``: the
    columns ``baseline_deltas`` compares, one row per baseline cell) with their per-example
    records (``baseline_examples``), and each ok configuration's label (``config_labels``). A
    cell's method is part of its cell_id and an ok row outranks any other, so the baselines are
    ranked among themselves."""
    found = con.sql("""
        select grouping(cell_id) = 1 as is_sweep, sweep, cell_id from raw_rows
        group by grouping sets ((sweep), (cell_id))
        having grouping(cell_id) = 1 or count(*) > 1
    """).to_arrow_table()
    is_sweep = found.column("is_sweep")
    repeated = found.filter(pc.invert(is_sweep)).select(["cell_id"])
    con.register("repeated_cells", repeated)
    con.register("store_sweeps", found.filter(is_sweep).select(["sweep"]))
    con.execute(f"""
        create temp table baseline_rows as
        {OK_ROWS.format(source="raw_rows", where="method = 'baseline' and status = 'ok'")}
        qualify row_number() over (partition by cell_id order by {ROW_ORDER_SQL}) = 1
    """)
    con.execute(f"""
        create temp table config_labels as
        select method as label_method, method_params as label_params, bits as label_bits,
               group_size as label_group_size, {CONFIG_LABEL.format(t='')} as config
        from (select distinct method, method_params, bits, group_size from raw_rows where status = 'ok')
    """)
    con.execute("create temp table baseline_examples as " + RECORDS_BY_ROW.format(
        source="""raw_rows r semi join baseline_rows b on b.cell_id = r.cell_id
                  and b.write_generation is not distinct from r.write_generation
                  and b.write_seq is not distinct from r.write_seq and b.finished_at is not distinct from r.finished_at""",
        where="r.method = 'baseline' and r.status = 'ok'"))
    return repeated.num_rows


def connect(results: str, sweep: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views; reads only the store, loads no
    extension, and is sealed: a query reads the store's files and nothing else (``seal``)."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False})
    store = Store(results)
    readable = register_rows(con, store, sweep)
    con.register("allocations", store.allocations())  # qsweep allocate's predictions
    # One row per cell_id. Only cells written more than once need ranking (store_facts): a
    # cell written once passes untouched, so no query pays for a de-duplication, and the views
    # stay plain scans that read only the columns a query names.
    if not store_facts(con):
        con.execute("create or replace view latest_rows as select * from raw_rows")
    else:
        con.execute(f"""
            create or replace view latest_rows as
            select r.* from raw_rows r anti join repeated_cells d on r.cell_id = d.cell_id
            union all
            select * from (select r.* from raw_rows r semi join repeated_cells d on r.cell_id = d.cell_id)
            qualify row_number() over (partition by cell_id order by {ROW_ORDER_SQL}) = 1
        """)
    prepare(con)
    for sql in VIEWS.values():
        con.execute(sql)
    con.register("columns", pa.table({
        "column_name": [name for name, _, _ in COLUMNS],
        "type": [str(dtype) for _, dtype, _ in COLUMNS],
        "definition": [doc for _, _, doc in COLUMNS],
    }))
    seal(con, readable)
    return con


def register_rows(con: duckdb.DuckDBPyConnection, store: Store, sweep: str | None) -> list[str]:
    """``raw_rows``: every row of the store's files as the current schema; returns the files a
    query must be able to read. A local store is read by DuckDB's own Parquet reader (several
    times faster than a scan through Arrow: threads over row groups, filters and projections
    inside the reader), its files grouped by their columns, each group read as the current
    schema (a column its files lack, older than it, read as null); an object store (no httpfs here) and a store with renamed columns are read through
    ``pyarrow.dataset`` (``Store.dataset``)."""
    files = store.files(sweep)
    if store.fs is not None or not files or RENAMED:
        con.register("raw_rows", store.dataset(sweep))
        return []
    con.register("row_schema", SCHEMA.empty_table())
    types = dict(con.execute("select column_name, column_type from (describe row_schema)").fetchall())
    con.unregister("row_schema")
    # Files grouped by their columns (every footer read once, here, by DuckDB's reader): each
    # group is bound from its first file, so a view that names raw_rows does not read every
    # footer of a sweep in progress again each time it is bound.
    groups: dict[tuple[str, ...], list[str]] = {}
    for path, names in con.execute(
            "select file_name, list(name order by name) from parquet_schema($files) group by file_name",
            {"files": files}).fetchall():
        groups.setdefault(tuple(names), []).append(path)
    selects = []
    for paths in sorted(groups.values(), key=min):
        listing = "[" + ", ".join(_sql_string(path) for path in sorted(paths)) + "]"
        # top-level columns only: parquet_schema also names the fields nested in lists of structs
        present = {row[0] for row in con.execute(f"describe select * from read_parquet({_sql_string(min(paths))})").fetchall()}
        columns = ", ".join(f'"{name}"' if name in present else f'null::{types[name]} as "{name}"'
                            for name in SCHEMA.names)
        selects.append(f"select {columns} from read_parquet({listing})")
    con.execute("create or replace view raw_rows as " + " union all ".join(selects))
    return files


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
