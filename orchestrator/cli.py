"""``qsweep``: plan, run, status and query a compression sweep.

Exit codes: 0 when every cell has a final row (ok, failed, skipped); 2 for an invalid spec or
bad arguments; 1 when the driver itself fails; 3 when another driver holds the sweep's lease
(``qsweep run --wait`` waits for it instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

from orchestrator.lease import LeaseHeld, acquire
from orchestrator.spec import DEFAULT_MAX_CELLS, SpecError, load_spec
from orchestrator.store import Store, StoreError
from orchestrator.table import render

EXIT_OK, EXIT_DRIVER, EXIT_USAGE, EXIT_HELD = 0, 1, 2, 3
AXES = ("model", "method", "bits", "group_size", "dataset")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 as well; keep its usage line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qsweep", description="Declarative LLM compression sweeps: quantize, "
                     "evaluate and profile every cell on Ray; query the results with DuckDB.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="validate a spec; show its cells, counts per axis and problems",
                       description="Validate SPEC and show the cells it expands to, counts per "
                       "axis, preflight skips and fallbacks. Exit 2 when the spec is invalid.")
    p.add_argument("spec", help="sweep YAML file")
    p.add_argument("--results", default="results", help="results directory, to show what is done (default: ./results)")
    p.add_argument("--cells", action="store_true", help="list every cell")
    _max_cells(p)

    p = sub.add_parser("run", help="run every cell that has no ok row yet",
                       description="Run SPEC on Ray (embedded locally, or the cluster at "
                       "RAY_ADDRESS). Cells with an ok row are not run again.")
    p.add_argument("spec", help="sweep YAML file")
    p.add_argument("--results", default="results", help="results directory (default: ./results)")
    p.add_argument("--gpus", type=_nonnegative, default=None,
                   help="GPUs for the embedded Ray (default: detected; logical GPUs for tests)")
    p.add_argument("--cpu-actors", type=_positive, default=None,
                   help="CPU actors when there is no GPU (default: the spec's cpu_actors, 1)")
    p.add_argument("--gpus-per-actor", type=_positive, default=None, metavar="N",
                   help="GPU actors of N GPUs each for every model whose entry sets no gpus_per_actor; "
                        "the driver waits for GPU nodes (an autoscaling cluster) instead of running "
                        "on the CPU, up to QSWEEP_GPU_WAIT_S seconds (default 900)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="show actor logs")
    p.add_argument("--artifact-cache", metavar="DIR", default=None,
                   help="keep quantized models in DIR by quantization-group hash and reuse them "
                        "(adding a dataset to a finished study does not quantize again); off by default")
    p.add_argument("--artifact-cache-gb", type=_float, default=None, metavar="GB",
                   help="size cap of the artifact cache; least recently used entries go first (default 20)")
    p.add_argument("--isolate", action="store_true",
                   help="run every cell this sweep has no ok row for, even when another sweep of the "
                        "same results finished it (default: reuse it; the spec's `reuse: false` says the same)")
    p.add_argument("--wait", action="store_true",
                   help="when another driver is running this sweep on the same results, wait for it "
                        "to finish (or for its heartbeat to stop) instead of exiting with code 3")
    p.add_argument("--rerun", action="append", default=[], metavar="KEY=VALUE[,...]",
                   help="run the cells matching every KEY=VALUE again although they have an ok row "
                        "(after a fix or a library upgrade), e.g. --rerun method=hqq,bits=3; keys: model, "
                        "method, bits, group_size, dataset or a method parameter; repeatable")
    _max_cells(p)

    p = sub.add_parser("fetch", help="download every hub model and dataset a spec names, for offline nodes",
                       description="Download every hub model (at its revision), dataset and "
                       "calibration set SPEC names into the hub and datasets caches, or with --to "
                       "DIR into DIR/hub and DIR/datasets on shared storage, so that compute nodes "
                       "without internet run the spec with HF_HUB_OFFLINE=1. HF_TOKEN is used for "
                       "gated models. Exit 1 when an item could not be fetched.")
    p.add_argument("spec", help="sweep spec (YAML)")
    p.add_argument("--to", metavar="DIR", help="download into DIR/hub and DIR/datasets instead of the "
                   "caches of this machine (then run with HF_HUB_CACHE=DIR/hub HF_DATASETS_CACHE=DIR/datasets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _max_cells(p)

    p = sub.add_parser("export", help="write a cell's quantized model as a checkpoint transformers loads",
                       description="Quantize CELL_ID's configuration again (or take it from the artifact "
                       "cache) and write it to OUT: the method's packed checkpoint (GPTQ, AWQ, "
                       "compressed-tensors, ...) when it saves one, else the dequantized weights; "
                       "with the tokenizer and qsweep_export.json. CELL_ID may be a unique prefix.")
    p.add_argument("cell_id", help="cell id (or a unique prefix) from the results")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--results", default="results", help="results directory (default: ./results)")
    p.add_argument("--artifact-cache", metavar="DIR", default=None,
                   help="artifact cache the sweep ran with, to export without quantizing again")

    p = sub.add_parser("status", help="done / failed / skipped / missing per axis",
                       description="Count, for each axis value of SPEC, the cells that are done "
                       "(ok), failed, skipped or missing in the store.")
    p.add_argument("spec", help="sweep YAML file")
    p.add_argument("--results", default="results", help="results directory (default: ./results)")
    _max_cells(p)

    p = sub.add_parser("compact", help="merge a sweep's per-cell files into a few files",
                       description="Fold the per-cell Parquet files of SWEEP (default: every "
                       "sweep in the store) into a new compacted part, newest row per cell; earlier "
                       "parts are left as they are unless a new row supersedes one of theirs (or "
                       "many small ones have piled up). Safe to kill; also run at the end of every "
                       "`qsweep run` and every 50 cells (or 5 minutes) during one.")
    p.add_argument("sweep", nargs="?", help="sweep name (default: all)")
    p.add_argument("--full", action="store_true",
                   help="merge every file of the sweep, parts included, into as few parts as possible")
    p.add_argument("--results", default="results", help="results directory (default: ./results)")

    p = sub.add_parser("query", help="SQL or a named query over the results (views: cells, metrics, ...)",
                       description="Run SQL on DuckDB over the store. Views: cells (one row per "
                       "cell, newest wins), metrics (cell_id, dataset, metric, value, stderr, n, "
                       "definition), layers, examples, columns, metric_directions, baseline_deltas, "
                       "pareto, table1, sensitivity, engine_agreement (columns: analysis/views.py, "
                       "analysis/derived.py). Queries only (SELECT, DESCRIBE, SHOW, EXPLAIN): a query "
                       "reads the store's own files and nothing else (no other file, no network, no "
                       "extension), and writes nothing; --out writes the answer.")
    p.add_argument("sql", help='SQL, e.g. "select method, bits, group_size, status from cells", or a '
                   f"named query: {_named_queries()}")
    p.add_argument("--results", default="results", help="results directory (default: ./results)")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table",
                   help="output format (parquet needs --out)")
    p.add_argument("--out", help="write the result to this file instead of stdout")

    p = sub.add_parser("recommend", help="the best configs that meet a quality / size / speed budget",
                       description="Configs on DATASET that meet every given constraint, best first, "
                       "each with its evidence (score, delta and its uncertainty, size, speed). Says "
                       "when nothing qualifies and which constraint binds. Cells flagged as anomalies "
                       "are set aside.")
    p.add_argument("--results", default="results", help="results directory (default: ./results)")
    p.add_argument("--dataset", required=True, help="dataset name as in the spec")
    p.add_argument("--metric", help="quality metric (default: the dataset's primary metric)")
    p.add_argument("--model", help="only this model's configs")
    quality = p.add_mutually_exclusive_group()
    quality.add_argument("--max-drop", type=_drop, help="most quality lost vs the baseline, in the "
                         "metric's units (0.01 = one accuracy point), or relative with %% (2%%)")
    quality.add_argument("--min-recovery", type=_float, help="least recovery %% of the baseline (e.g. 99)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-weight-bytes", type=_size, help="largest weights: bytes or 170MB, 1.5GiB")
    size.add_argument("--max-memory", type=_size, help="largest measured peak memory (NVML, CUDA "
                      "reserved or CPU RSS, the first measured): bytes or 2GB")
    p.add_argument("--max-latency-ms", type=_float, help="slowest per-token latency (tpot_p50_ms)")
    p.add_argument("--by", choices=("size", "quality", "latency"), default="size",
                   help="rank qualifying configs by (default: size)")
    p.add_argument("--top", type=_positive, default=5, help="configs to show (default 5)")

    p = sub.add_parser("allocate", help="mixed precision from a sensitivity study, under a size budget",
                       description="Read a finished sensitivity study (a spec's `sensitivity:` block) and "
                       "choose one option per unit that minimises the predicted KL divergence (the sum of "
                       "each unit's KL when quantized alone: an assumption the output states) under the "
                       "budget, exactly (an integer program solved to a zero gap). Writes the choice as a "
                       "spec that `qsweep run` runs as a normal cell into the same store; baseline_deltas "
                       "then shows predicted_kl beside the measured kl_divergence.")
    p.add_argument("--results", default="results", help="results directory of the study (default: ./results)")
    p.add_argument("--sweep", required=True, help="the study's sweep name")
    p.add_argument("--model", help="the model to allocate for (needed when the study has several)")
    p.add_argument("--dataset", help="the dataset whose KL drives the choice (needed when several have KL)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits-per-weight", type=_float, help="average stored bits per weight over the "
                        "study's units, scales and zeros included (e.g. 3.5)")
    budget.add_argument("--weight-bytes", type=_size, help="bytes of the whole model's weights: bytes or 60MB")
    p.add_argument("--out", required=True, help="the spec file to write (YAML)")
    p.add_argument("--name", help="the written spec's sweep name (default: <sweep>-mixed-<budget>)")

    p = sub.add_parser("report", help="plots (PNG) and one self-contained HTML page",
                       description="Write PNG plots and report.html (images embedded) to OUT: "
                       "quality vs bits per weight, group size x bits recovery heatmaps, Pareto "
                       "fronts, latency and memory per method, failures and anomalies, Table 1.")
    p.add_argument("--results", default="results", help="results directory (default: ./results)")
    p.add_argument("--out", required=True, help="output directory")
    return parser


def _named_queries() -> str:
    from analysis.named import describe

    return describe().replace("%", "%%")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value


def _drop(text: str) -> tuple[float, bool]:
    relative = text.strip().endswith("%")
    return _float(text.strip().rstrip("%")), relative


def _size(text: str) -> int:
    from analysis.recommend import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _integer(minimum: int, below: str):
    """An argparse type: an integer >= ``minimum``; ``below`` says what a smaller one is."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} {below}")
        return value

    return parse


_positive = _integer(1, "is not a positive integer")
_nonnegative = _integer(0, "is negative")


def _max_cells(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-cells", type=_positive, default=DEFAULT_MAX_CELLS,
                   help=f"refuse specs that expand past this many cells (default {DEFAULT_MAX_CELLS:,})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tasks.errors import redact_logs

    redact_logs()
    try:
        return COMMANDS[args.command](args)
    except SpecError as exc:
        print(f"invalid spec ({len(exc.problems)} problem{'s' * (len(exc.problems) > 1)}):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"qsweep: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qsweep: interrupted; finished cells are in the store, run again to resume", file=sys.stderr)
        return EXIT_DRIVER


def cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.driver import make_plan

    spec = load_spec(args.spec, max_cells=args.max_cells)
    plan = make_plan(spec, Store(args.results))
    print(f"sweep {spec.name}: {len(plan.cells)} cells in "
          f"{len({c.group_id for c in plan.cells})} quantization groups; {len(plan.done)} done"
          + (f" ({len(plan.reused)} by other sweeps of the store, reused)" if plan.reused else "") + ", "
          f"{len(plan.skipped)} skipped by preflight, {len(plan.pending)} to run")
    attribute = {"model": lambda c: c.model.name, "method": lambda c: c.method,
                 "bits": lambda c: c.bits, "group_size": lambda c: c.group_size,
                 "dataset": lambda c: c.dataset.name}
    for axis in AXES:
        counts = Counter(str(attribute[axis](c)) for c in plan.cells)
        print(f"  {axis:<11}" + ", ".join(f"{v}: {n}" for v, n in counts.items()))
    reasons = Counter(v.reason for v in plan.skipped.values())
    for reason, n in reasons.items():
        example = next(c for c in plan.cells if c.cell_id in plan.skipped
                       and plan.skipped[c.cell_id].reason == reason)
        verdict = plan.skipped[example.cell_id]
        again = ("; `qsweep run` judges it again on a worker, where the cells run"
                 if verdict.error_class in ("data", "oom") and (verdict.where or "").startswith("driver") else "")
        print(f"  skip ({n} cells, e.g. {_label(example)}): {reason}{again}")
    notes = Counter(plan.notes.values())
    for note, n in notes.items():
        # a deferred check is a check not done: say so louder than a fallback note
        print(f"  {'WARNING' if 'deferred' in note else 'note'} ({n} cells): {note}")
    if args.cells:
        rows = [(c.cell_id, c.model.name, c.method, _params(c), c.bits, c.group_size, c.dataset.name,
                 "done" if c.cell_id in plan.done else "skip" if c.cell_id in plan.skipped else "to run")
                for c in plan.cells]
        print(render(["cell_id", "model", "method", "params", "bits", "group_size", "dataset", "state"], rows))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.cells import expand, parse_rerun
    from orchestrator.driver import run_sweep

    spec = load_spec(args.spec, max_cells=args.max_cells)
    if args.isolate:
        spec = dataclasses.replace(spec, reuse=False)
    try:
        rerun = parse_rerun(args.rerun, expand(spec)) if args.rerun else []
    except ValueError as exc:
        print(f"qsweep run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = Store(args.results)
    _artifact_cache_env(args)
    try:
        result = run_sweep(spec, store, gpus=args.gpus, cpu_actors=args.cpu_actors,
                           progress=not args.no_progress, verbose=args.verbose, rerun=rerun,
                           wait=args.wait, gpus_per_actor=args.gpus_per_actor)
    except LeaseHeld as exc:
        print(f"qsweep run: {exc}", file=sys.stderr)
        return EXIT_HELD
    except (StoreError, SpecError):
        raise
    except Exception:
        logging.getLogger("qsweep").exception("the driver failed; finished cells are in the store")
        return EXIT_DRIVER
    print(f"ran {result.ran} cells in {result.wall_s:.1f} s; rows written: {result.rows_written} "
          f"({', '.join(f'{k}: {v}' for k, v in sorted(result.statuses.items())) or 'none'})"
          + (f"; reused from other sweeps: {result.reused}" if result.reused else ""))
    print(summary_table(args.results, spec.name))
    print(f"results: {store.cells_dir(spec.name)}")
    return EXIT_OK


def _artifact_cache_env(args: argparse.Namespace) -> None:
    """The artifact cache reaches actors through the environment the driver forwards."""
    if args.artifact_cache:
        os.environ["QSWEEP_ARTIFACT_CACHE"] = str(Path(args.artifact_cache).expanduser().resolve())
    if getattr(args, "artifact_cache_gb", None) is not None:
        os.environ["QSWEEP_ARTIFACT_CACHE_GB"] = str(args.artifact_cache_gb)


def cmd_fetch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from orchestrator.fetch import caches, fetch_item, hub_reachable, items, offline_env

    spec = load_spec(args.spec, max_cells=args.max_cells)
    wanted, local = items(spec)
    for line in local:
        print(f"  needs no download: {line}")
    if not wanted:
        print(f"sweep {spec.name}: nothing on the hub to fetch")
        return EXIT_OK
    if not hub_reachable():
        print("qsweep fetch: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set to 1; unset them to reach "
              "the hub (fetch runs where the hub can be reached)", file=sys.stderr)
        return EXIT_USAGE
    hub_cache, datasets_cache = caches(args.to)
    failed = 0
    bar = tqdm(wanted, desc="fetch", unit="item", disable=args.no_progress)
    for item in bar:
        bar.set_postfix_str(item.name)
        label = f"{item.what} {item.name}" + (f"@{item.revision}" if item.revision else "")
        try:
            tqdm.write(f"  {label}: {fetch_item(item, hub_cache, datasets_cache)}")
        except Exception as exc:  # noqa: BLE001 - each item says what went wrong; the rest go on
            from tasks.errors import redact

            failed += 1
            tqdm.write(f"  {label}: FAILED: {redact(f'{type(exc).__name__}: {exc}')[:600]}")
    print(f"fetched {len(wanted) - failed} of {len(wanted)} items"
          + (f" into {Path(args.to).expanduser().resolve()}" if args.to else " into this machine's caches")
          + f"; run offline with: {offline_env(args.to)}")
    return EXIT_DRIVER if failed else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from tasks.export import ExportError, export_cell

    store = Store(args.results)
    if not store.files():
        print(f"qsweep export: no results in {store.root}; run a sweep first or pass --results", file=sys.stderr)
        return EXIT_USAGE
    rows = [r for r in store.read().to_pylist() if r["cell_id"].startswith(args.cell_id)]
    if not rows:
        print(f"qsweep export: no cell {args.cell_id!r} in {store.root}; "
              "`qsweep query \"select cell_id, method, bits, group_size from cells\"` lists them", file=sys.stderr)
        return EXIT_USAGE
    if len({r["cell_id"] for r in rows}) > 1:
        shown = ", ".join(sorted({r["cell_id"][:16] for r in rows})[:5])
        print(f"qsweep export: {args.cell_id!r} matches {len({r['cell_id'] for r in rows})} cells ({shown}, ...); "
              "give more of the id", file=sys.stderr)
        return EXIT_USAGE
    row = rows[0]
    if row["status"] != "ok":
        print(f"qsweep export: cell {row['cell_id'][:16]} has status {row['status']}: "
              f"{row['error_message'] or ''}; nothing to export", file=sys.stderr)
        return EXIT_USAGE
    _artifact_cache_env(args)
    try:
        manifest = export_cell(row, Path(args.out))
    except ExportError as exc:
        print(f"qsweep export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"exported {manifest['method']} w{manifest['bits']} g{manifest['group_size']} "
          f"({manifest['format']}) to {args.out}: {size / 1e6:.1f} MB")
    return EXIT_OK


def summary_table(results: str, sweep: str) -> str:
    from analysis.views import connect

    con = connect(results, sweep)
    sql = """
        select method, regexp_replace(method_params, '[{}" ]', '', 'g') as params, bits, group_size, dataset, status,
               primary_metric as metric, round(primary_value, 3) as value, round(kl_divergence, 4) as kl,
               round(weight_bytes / 1e6, 1) as weight_mb, round(bits_per_weight, 3) as bpw,
               round(compression_ratio, 2) as x_smaller,
               coalesce(error_class || ': ' || error_message,
                        nullif(concat_ws('; ', fallback, case when compute_dtype <> dtype
                                                              then 'computed in ' || compute_dtype end,
                                         'reused from ' || reused_from), '')) as note
        from cells order by model, dataset, method, bits nulls first, group_size, params
    """
    rel = con.execute(sql)
    return render([d[0] for d in rel.description], rel.fetchall())


def cmd_status(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, max_cells=args.max_cells)
    from orchestrator.cells import expand
    from orchestrator.preflight import validate_models

    validate_models(spec)

    cells = expand(spec)
    store = Store(args.results)
    rows, timings = {}, []
    if store.files(spec.name):
        timing_columns = ["status", "group_id", "time_overhead_s", "time_load_s", "time_quantize_s",
                          "time_evaluate_s", "time_profile_s"]
        wanted = {c.cell_id for c in cells}
        timings = [r for r in store.read(spec.name, columns=timing_columns).to_pylist() if r["cell_id"] in wanted]
        rows = {r["cell_id"]: r["status"] for r in timings}
    states = ("ok", "failed", "timeout", "skipped", "missing")
    table = {axis: defaultdict(Counter) for axis in AXES}
    for cell in cells:
        state = rows.get(cell.cell_id, "missing")
        for axis in AXES:
            table[axis][str(cell.axis_values()[axis])][state] += 1
    total = Counter(rows.get(c.cell_id, "missing") for c in cells)
    print(f"sweep {spec.name}: {len(cells)} cells; " + ", ".join(f"{s}: {total[s]}" for s in states))
    print(render(["axis", "value", *states],
                 [(axis, value, *(counts[s] for s in states))
                  for axis in AXES for value, counts in table[axis].items()]))
    print(overhead_line(timings))
    return EXIT_OK


def overhead_line(rows: list[dict]) -> str:
    """Orchestration overhead (Ray + driver) against the compute it served."""
    measured = [r for r in rows if r.get("time_overhead_s") is not None]
    if not measured:
        return "orchestration overhead: not measured (no rows with time_overhead_s)"
    overhead = sorted(r["time_overhead_s"] for r in measured)
    groups = {r["group_id"]: (r["time_load_s"] or 0) + (r["time_quantize_s"] or 0) for r in measured}
    compute = sum(groups.values()) + sum((r["time_evaluate_s"] or 0) + (r["time_profile_s"] or 0) for r in measured)
    share = f", {100 * sum(overhead) / compute:.2f}% of the cells' compute ({compute:.1f} s)" if compute else ""
    return (f"orchestration overhead: median {1000 * overhead[len(overhead) // 2]:.1f} ms per cell, "
            f"total {sum(overhead):.2f} s over {len(measured)} cells{share}")


def cmd_compact(args: argparse.Namespace) -> int:
    store = Store(args.results)
    sweeps = [args.sweep] if args.sweep else sorted({Path(f).parent.parent.name for f in store.files()})
    if args.sweep and not store.files(args.sweep):
        print(f"qsweep compact: no rows for sweep '{args.sweep}' in {store.root}", file=sys.stderr)
        return EXIT_USAGE
    for sweep in sweeps:
        try:
            with acquire(store.leases(), sweep):  # never beside a driver writing this sweep
                files_in, files_out = store.compact(sweep, full=args.full)
        except LeaseHeld as exc:
            print(f"qsweep compact: {exc} (it compacts the sweep itself when it ends)", file=sys.stderr)
            return EXIT_HELD
        print(f"{sweep}: {files_in} files -> {files_out}")
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from analysis.derived import check_read_only
    from analysis.named import resolve
    from analysis.views import connect

    if args.format == "parquet" and not args.out:
        print("qsweep query: --format parquet writes a file: add --out PATH", file=sys.stderr)
        return EXIT_USAGE
    try:
        con = connect(args.results)
    except duckdb.Error as exc:  # a store file that is not Parquet (written by something else)
        print(f"qsweep query: cannot read the store at {args.results}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_read_only(con, resolve(args.sql))
        if args.format == "parquet":
            import pyarrow.parquet as pq

            relation = con.sql(resolve(args.sql))
            if relation is not None:
                pq.write_table(relation.to_arrow_table(), args.out)
            return EXIT_OK
        rel = con.execute(resolve(args.sql))
    except duckdb.Error as exc:
        print(f"qsweep query: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if rel.description is None:
        return EXIT_OK
    columns = [d[0] for d in rel.description]
    rows = rel.fetchall()
    out = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115 (stdout or a file)
    try:
        if args.format == "table":
            print(render(columns, rows, max_width=80), file=out)
        elif args.format == "csv":
            import csv

            writer = csv.writer(out)
            writer.writerow(columns)
            writer.writerows(rows)
        else:
            import json

            print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1), file=out)
    finally:
        if args.out:
            out.close()
    return EXIT_OK


def cmd_recommend(args: argparse.Namespace) -> int:
    from analysis.recommend import Budget, BudgetError, evidence, recommend
    from analysis.views import connect

    drop, relative = args.max_drop or (None, False)
    budget = Budget(max_drop=drop, max_drop_relative=relative, min_recovery=args.min_recovery,
                    max_weight_bytes=args.max_weight_bytes, max_memory=args.max_memory,
                    max_latency_ms=args.max_latency_ms)
    try:
        answer = recommend(connect(args.results), args.dataset, budget, metric=args.metric,
                           model=args.model, rank=args.by, top=args.top)
    except BudgetError as exc:
        print(f"qsweep recommend: {exc}", file=sys.stderr)
        return EXIT_USAGE
    direction = "higher" if answer.higher_is_better else "lower"
    asked = "; ".join(answer.constraints.values()) or "no constraint"
    print(f"{answer.dataset} / {answer.metric} ({direction} is better): {answer.candidates} configs; "
          f"budget: {asked}")
    if answer.picks:
        print(f"{len(answer.picks)} best by {args.by}:")
        for i, row in enumerate(answer.picks, 1):
            print(f"  {i}. {row['model']} {row['config']}\n     {evidence(row, answer.metric)}")
    else:
        print("no config meets the budget" + (f"; binding: {', '.join('--' + b for b in answer.binding)}"
                                              if answer.binding else ""))
        for line in answer.diagnosis:
            print(f"  {line}")
    for row in answer.set_aside:
        print(f"  set aside: {row['model']} {row['config']}: {row['anomaly']}")
    return EXIT_OK


def cmd_allocate(args: argparse.Namespace) -> int:
    import yaml

    from analysis import allocate as alloc
    from analysis.views import connect
    from orchestrator.cells import expand

    con = connect(args.results)
    try:
        rows, model, dataset = alloc.study_rows(con, args.sweep, args.model, args.dataset)
        allocation = alloc.allocate(rows, dataset, bits_per_weight=args.bits_per_weight,
                                    weight_bytes=args.weight_bytes)
    except alloc.AllocationError as exc:
        print(f"qsweep allocate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    budget = ({"bits_per_weight": args.bits_per_weight} if args.bits_per_weight is not None
              else {"weight_bytes": args.weight_bytes})
    tag = (f"bpw{args.bits_per_weight:g}" if args.bits_per_weight is not None else f"bytes{args.weight_bytes}")
    name = args.name or f"{args.sweep}-mixed-{tag}".replace("/", "-")
    context = alloc.study_context(con, args.sweep, model, rows[0]["cell_id"])
    spec = alloc.mixed_spec(allocation, context, name)
    out = Path(args.out)
    header = (f"# Written by `qsweep allocate --sweep {args.sweep}` from {len(allocation.choices)} units of "
              f"{model}, KL on {dataset}\n# budget: {budget}; chosen: {allocation.bits_per_weight:.4f} bits per "
              f"weight over the units, {allocation.weight_bytes:,.0f} weight bytes; predicted KL "
              f"{allocation.predicted_kl:.5f}\n# {alloc.ASSUMPTION}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    cells = expand(load_spec(out))
    predicted = alloc.predictions(allocation, rows, cells)
    allocation_id = alloc.allocation_id(args.sweep, model, dataset, budget, spec)
    record = json.dumps({"study": args.sweep, "model": model, "dataset": dataset, "budget": budget,
                         "solver": "scipy.optimize.milp (HiGHS), mip_rel_gap 0", "assumption": alloc.ASSUMPTION,
                         "bits_per_weight": allocation.bits_per_weight, "weight_bytes": allocation.weight_bytes,
                         "choices": {c.unit: alloc.option_label((c.bits, c.group_size)) for c in allocation.choices}},
                        sort_keys=True)
    import pyarrow as pa

    Store(args.results).write_allocation(allocation_id, pa.table({
        "allocation_id": [allocation_id] * len(predicted), "cell_id": list(predicted),
        "predicted_kl": list(predicted.values()), "allocation": [record] * len(predicted)}))
    counts = Counter(alloc.option_label((c.bits, c.group_size)) for c in allocation.choices)
    print(f"{model}: {len(allocation.choices)} {rows[0]['unit_kind']} units; KL from {dataset}")
    print(f"budget {budget}: chosen {allocation.bits_per_weight:.4f} bits per weight over the units "
          f"({allocation.unit_bytes:,.0f} of {allocation.budget_bytes:,.0f} bytes allowed), "
          f"{allocation.weight_bytes:,.0f} weight bytes in all")
    print("options: " + ", ".join(f"{option} x{n}" for option, n in sorted(counts.items())))
    print(f"predicted KL {allocation.predicted_kl:.5f} ({alloc.ASSUMPTION})")
    for uniform in alloc.uniform_predictions(rows, dataset):
        print(f"  uniform {uniform['option']}: {uniform['bits_per_weight']:.4f} bits per weight, "
              f"predicted KL {uniform['predicted_kl']:.5f}")
    print(f"wrote {out} ({len(cells)} cells); run it with `qsweep run {out} --results {args.results}`, then "
          "`qsweep query \"select config, dataset, kl_divergence, predicted_kl, value from baseline_deltas "
          "where predicted_kl is not null\"`")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    page = write_report(args.results, args.out)
    print(f"report: {page}")
    return EXIT_OK


def _params(cell) -> str:
    return ",".join(f"{k}={v}" for k, v in cell.params.items() if v is not None) or "-"


def _label(cell) -> str:
    return f"{cell.model.name}/{cell.method}[{_params(cell)}]/b{cell.bits}/g{cell.group_size}/{cell.dataset.name}"


COMMANDS = {"plan": cmd_plan, "run": cmd_run, "fetch": cmd_fetch, "export": cmd_export, "status": cmd_status, "compact": cmd_compact,
            "query": cmd_query, "recommend": cmd_recommend, "allocate": cmd_allocate, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
