"""The Ray driver: preflight, schedule quantization groups onto actors, write every row.

One actor per GPU (``num_gpus=1``, so Ray pins ``CUDA_VISIBLE_DEVICES``); without GPUs, a
configurable number of CPU actors. Cells sharing a quantization config go to one actor, which
quantizes once and evaluates each dataset. The driver is the single writer of the store.
Imports no torch: it may run on a CPU head node.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator import schedule
from orchestrator.cells import Cell, Group, expand, group_cells, identity_columns, rerun_ids
from orchestrator.lease import Lease, acquire
from orchestrator.preflight import (
    check,
    here,
    host_memory_bytes,
    local_paths,
    machine_verdict,
    validate_models,
)
from orchestrator.spec import Spec
from orchestrator.store import Store

log = logging.getLogger(__name__)

# Reach every actor through Ray's runtime env: the hub's address and offline switches, the shared
# caches, and qsweep's own knobs.
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE",
                 "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "QSWEEP_ARTIFACT_CACHE",
                 "QSWEEP_ARTIFACT_CACHE_GB", "QSWEEP_REFERENCE_CACHE_MB")
# Secrets reach every actor too, but as an argument of the actor (and of the probe task), never
# in the runtime env: Ray's runtime-env agent writes the whole runtime env, env_vars included, to
# its log (runtime_env_agent.log). Rows and log lines are redacted besides (tasks.errors).
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Paths of the driver's own machine: forwarded to an embedded Ray (the same machine), but on a
# cluster only when named in QSWEEP_FORWARD_ENV (or set in the job's runtime env): a worker node
# keeps its own (node-local scratch, its own cache).
MACHINE_ENV = ("HF_HOME", "QSWEEP_CACHE", "QSWEEP_SCRATCH")
# Compaction while a sweep runs: every this many new rows, or this many seconds with new rows
# (QSWEEP_COMPACT_EVERY_CELLS / QSWEEP_COMPACT_EVERY_S override).
COMPACT_EVERY_CELLS, COMPACT_EVERY_S = 50, 300.0
DONE_STATUSES = ("ok",)
GROW_EVERY_S = 10.0  # how often a driver with queued groups looks for GPU slots that appeared


def spec_hash(spec: Spec) -> str:
    text = json.dumps(spec.raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Plan:
    cells: list[Cell]
    done: set[str]
    skipped: dict[str, Any]  # cell_id -> Verdict
    notes: dict[str, str]  # cell_id -> fallback note
    pending: list[Cell] = field(default_factory=list)
    prior_attempts: dict[str, int] = field(default_factory=dict)  # of cells not yet ok
    skips_on_record: set[tuple[str, str]] = field(default_factory=set)  # (cell_id, reason) stored
    ok_on_record: set[str] = field(default_factory=set)  # cells with an ok row (rerun ones too)
    reused: dict[str, str] = field(default_factory=dict)  # cell_id -> the other sweep it is ok in
    facts: dict[str, Any] = field(default_factory=dict)  # model path -> ModelFacts on the driver


def make_plan(spec: Spec, store: Store | None, rerun: list[dict[str, list]] | None = None,
              machine: bool = True) -> Plan:
    """What to run: every cell without an ok row, and those ``rerun`` rules (see
    ``orchestrator.cells.parse_rerun``) ask for again. Only those are judged by preflight: an
    ok row is final. ``machine=False`` leaves the facts of the machines cells run on (paths,
    memory) to ``machine_verdicts`` on a worker."""
    cells = expand(spec)
    facts = validate_models(spec)
    memory = host_memory_bytes() if machine else None
    existing = {}
    if store is not None and store.files(spec.name):
        table = store.read(spec.name, columns=["cell_id", "status", "error_message", "attempts"])
        existing = {r["cell_id"]: r for r in table.to_pylist()}
    ok_on_record = {cid for cid, r in existing.items() if r["status"] in DONE_STATUSES}
    again = rerun_ids(rerun or [], cells)
    done = ok_on_record - again
    reused = {}
    if store is not None and spec.reuse and store.files():
        # a cell's identity is the experiment: one finished ok in any sweep of the store is done
        wanted = {c.cell_id for c in cells} - ok_on_record - again
        others = store.read(None, columns=["cell_id", "status", "sweep"])
        reused = {r["cell_id"]: r["sweep"] for r in others.to_pylist()
                  if r["cell_id"] in wanted and r["status"] in DONE_STATUSES and r["sweep"] != spec.name}
        done |= set(reused)
    skipped, notes, pending, verdicts = {}, {}, [], {}
    for cell in cells:
        if cell.cell_id in done:
            continue  # never judged again: nothing can replace its row but --rerun
        # A verdict depends on these alone (the dataset by its path): decide once per combination.
        key = (cell.model.path, cell.model.dtype, cell.method, cell.params_canonical or str(cell.params), cell.bits,
               cell.group_size, cell.dataset.path,
               (cell.calibration or {}).get("dataset"))
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = check(cell, facts[cell.model.path], memory, machine)
        if verdict.note:
            notes[cell.cell_id] = verdict.note
        if verdict.skip:
            skipped[cell.cell_id] = verdict
        else:
            pending.append(cell)
    prior = {c.cell_id: existing[c.cell_id]["attempts"] or 0 for c in pending if c.cell_id in existing}
    on_record = {(cid, r["error_message"]) for cid, r in existing.items() if r["status"] == "skipped"}
    return Plan(cells=cells, done=done, skipped=skipped, notes=notes, pending=pending,
                prior_attempts=prior, skips_on_record=on_record, ok_on_record=ok_on_record, facts=facts,
                reused=reused)


def complete_row(cell: Cell, partial: dict[str, Any], sweep_hash: str, attempts: int) -> dict[str, Any]:
    return {**identity_columns(cell), "spec_hash": sweep_hash, "attempts": attempts, **partial}


def skipped_row(cell: Cell, verdict: Any, sweep_hash: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    where = verdict.where or here()
    return complete_row(cell, {
        "status": "skipped", "error_class": verdict.error_class, "error_stage": "preflight",
        "error_message": verdict.reason, "host": where.split(" ", 1)[-1], "checked_on": where,
        "started_at": now, "finished_at": now}, sweep_hash, attempts=0)


@dataclass
class RunResult:
    ran: int
    rows_written: int
    statuses: Counter
    wall_s: float
    reused: int = 0  # cells another sweep of the store had finished, written as this sweep's rows


@dataclass
class Running:
    """A group streaming its cells' rows back from one actor."""

    actor: Any
    group: Group
    remaining: list[Cell]
    deadline: float | None
    got_any: bool = False  # a cell's row came back from this run
    stage: str = "quantize"  # "evaluate" once the worker says quantization is done
    last_event: float = field(default_factory=time.monotonic)  # submission or previous item
    carried_overhead: float = 0.0  # driver/Ray time around the group's load+quantize
    expected_s: float = 0.0  # the scheduler's expected cost of the whole unit
    started: float = field(default_factory=time.monotonic)

    def expected_left(self, now: float) -> float:
        return max(0.0, self.expected_s - (now - self.started))


def run_sweep(spec: Spec, store: Store, gpus: int | None = None, cpu_actors: int | None = None,
              progress: bool = True, verbose: bool = False,
              rerun: list[dict[str, list]] | None = None, wait: bool = False,
              gpus_per_actor: int | None = None) -> RunResult:
    """Run every cell of ``spec`` that has no ``ok`` row in ``store``.

    The driver first takes the sweep's lease (``orchestrator.lease``; another driver holding it
    raises ``LeaseHeld``, or with ``wait`` is waited for) and holds it until the sweep is
    written and compacted. Rows stream back cell by cell and are written as they arrive, so
    killing the driver or an actor loses at most the cells in flight. A dead actor (``crash``),
    any Ray error, or a cell past ``timeout_s`` (the actor is killed: Ray cannot cancel a
    running method) is retried on a fresh actor up to ``retries``; then its row records what
    happened. Cells matching a ``rerun`` rule run again even when done; their new ok row
    supersedes the old, a failure never replaces an ok row.

    Actors hold one GPU each, or a model entry's ``gpus_per_actor`` (packed per node; the
    groups of each actor size run as a phase, largest first). ``gpus_per_actor`` here is the
    default for models that set none and asks for GPU actors: without GPU nodes the driver
    waits for them (``QSWEEP_GPU_WAIT_S``) instead of running on the CPU.
    """
    started = time.perf_counter()
    store.check_writable(spec.name)
    lease = acquire(store.leases(), spec.name, wait=wait)
    try:
        if gpus_per_actor is not None:  # where cells run, not what they are: identities unchanged
            spec = replace(spec, models=tuple(
                replace(m, gpus_per_actor=gpus_per_actor) if m.gpus_per_actor == 1 else m for m in spec.models))
        sweep = SweepRun(spec, store, lease, progress, gpus_required=gpus_per_actor is not None)
        sweep.run(gpus, cpu_actors or spec.cpu_actors, verbose, rerun)
        store.compact(spec.name)
    finally:
        lease.release()
    return RunResult(ran=sweep.ran, rows_written=sweep.written, statuses=sweep.statuses,
                     wall_s=time.perf_counter() - started, reused=sweep.reused)


class SweepRun:
    """One driver run of a sweep under its lease: the plan, the queue of groups, the writes."""

    def __init__(self, spec: Spec, store: Store, lease: Lease, progress: bool, gpus_required: bool = False):
        self.spec, self.store, self.lease, self.progress = spec, store, lease, progress
        self.gpus_required = gpus_required  # GPU actors or none: never the CPU fallback
        self.sweep_hash = spec_hash(spec)
        self.statuses: Counter = Counter()
        self.written = self.ran = self.reused = 0
        self.tries: Counter = Counter()  # attempts per cell ended by a crash, a Ray error or a timeout
        self.queue: list[Group] = []  # units to run (orchestrator.schedule), longest first
        self.costs: schedule.Costs | None = None
        self.bar: Any = None
        self.plan: Plan | None = None
        self._compacted_at_rows, self._compacted_at = 0, time.monotonic()

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write rows under the lease, stamped with its sequence; a row that is not ok for a
        cell with an ok row on record is not written (an ok row is final)."""
        keep = []
        for row in rows:
            if row["status"] != "ok" and row["cell_id"] in self.plan.ok_on_record:
                log.warning("cell %s: its %s row (%s) is not written: the cell's ok row stays",
                            row["cell_id"], row["status"], row.get("error_message"))
            else:
                keep.append(row)
        self.lease.check()
        self.store.write_rows(self.lease.stamp(keep))
        return keep

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Final rows: written (``written`` counts those the store got) and counted."""
        self.written += len(self.write(rows))
        self.statuses.update(r["status"] for r in rows)
        self.compact_if_due()
        if self.bar is not None:
            self.bar.update(len(rows))
            self.bar.set_postfix({k: v for k, v in self.statuses.items() if v})

    def compact_if_due(self) -> None:
        """Compact while the sweep runs, every ``COMPACT_EVERY_CELLS`` rows or
        ``COMPACT_EVERY_S`` seconds with new rows (incremental: only the new rows are written
        as a part), so that readers of a long sweep never face tens of thousands of one-row
        files. Under the lease, like every write; a failed compaction is logged, never fatal
        (the rows are on disk as their own files)."""
        pending = self.written - self._compacted_at_rows
        if pending <= 0:
            return
        every_cells = int(os.environ.get("QSWEEP_COMPACT_EVERY_CELLS") or COMPACT_EVERY_CELLS)
        every_s = float(os.environ.get("QSWEEP_COMPACT_EVERY_S") or COMPACT_EVERY_S)
        if pending < every_cells and time.monotonic() - self._compacted_at < every_s:
            return
        self.lease.check()
        try:
            files_in, files_out = self.store.compact(self.spec.name)
            log.info("compacted %d files into %d while the sweep runs", files_in, files_out)
        except Exception as exc:  # noqa: BLE001 - the rows stay as their own files
            log.warning("compaction during the sweep failed (%s: %s); it runs again at the end",
                        type(exc).__name__, exc)
        self._compacted_at_rows, self._compacted_at = self.written, time.monotonic()

    def reuse(self) -> None:
        """Rows for the cells another sweep of the store finished ok: that sweep's row, in this
        sweep's name, saying where it came from (``reused_from``); nothing runs again."""
        if not self.plan.reused:
            return
        rows = []
        for row in self.store.read_cells(set(self.plan.reused)).to_pylist():
            if row["status"] != "ok":
                continue
            origin = f"{row['sweep']} (run {row['run_id']})" if row.get("run_id") else row["sweep"]
            rows.append({**row, "sweep": self.spec.name, "spec_hash": self.sweep_hash, "reused_from": origin})
        log.info("sweep %s: %d cells reused from other sweeps of the store", self.spec.name, len(rows))
        self.write(rows)
        self.reused = len(rows)

    def skip(self, cells: list[Cell], verdicts: dict[str, Any]) -> None:
        on_record = self.plan.skips_on_record
        self.record([skipped_row(c, verdicts[c.cell_id], self.sweep_hash) for c in cells
                     if (c.cell_id, verdicts[c.cell_id].reason) not in on_record])

    def lost(self, run: Running, error_class: str, message: str) -> None:
        """The actor is gone mid-group: blame the cell in flight (all remaining ones if it died
        loading or quantizing) and write its row at once, so the store knows even if the driver
        dies next; retry within budget (the retry's row replaces it); requeue the rest."""
        blamed = run.remaining if run.stage == "quantize" else run.remaining[:1]
        final, interim = [], []
        for cell in blamed:
            self.tries[cell.cell_id] += 1
            row = failure_row(cell, error_class, run.stage, message, self.sweep_hash,
                              self.plan.prior_attempts.get(cell.cell_id, 0) + self.tries[cell.cell_id])
            (final if self.tries[cell.cell_id] > self.spec.retries[error_class] else interim).append(row)
        self.write(interim)
        self.record(final)
        done = {r["cell_id"] for r in final}
        rest = tuple(c for c in run.remaining if c.cell_id not in done)
        if rest:
            self.queue.insert(0, Group(group_id=run.group.group_id, cells=rest))

    def run(self, gpus: int | None, cpu_actors: int, verbose: bool,
            rerun: list[dict[str, list]] | None) -> None:
        self.plan = plan = make_plan(self.spec, self.store, rerun, machine=False)
        self.reuse()
        self.skip([c for c in plan.cells if c.cell_id in plan.skipped], plan.skipped)
        if not plan.pending:
            return
        import ray
        from tqdm import tqdm

        _init_ray(gpus, verbose)
        try:
            pool = ActorPool(len(plan.pending), cpu_actors)  # a group's cells may spread
            self.check_on_worker(pool)
            groups = group_cells(plan.pending)
            if not groups:
                return
            self.costs = self.expected_costs(groups)
            self.ran = len(plan.pending)
            self.bar = tqdm(total=len(plan.pending), unit="cell", desc=f"sweep {self.spec.name}",
                            disable=not self.progress)
            for size, phase in phases(groups):  # the largest actors first, each size its own pool
                if size != pool.gpus_per_actor:
                    pool.shutdown()
                    pool = ActorPool(sum(len(g.cells) for g in phase), cpu_actors, gpus_per_actor=size)
                if (size > 1 or self.gpus_required) and not pool.wait_for_gpus():
                    self.no_gpus(phase, size)
                    continue
                self.queue = schedule.plan(phase, self.costs, pool.size)
                pool.size = min(pool.size, len(self.queue))
                self.schedule(ray, pool)
            self.bar.close()
        finally:
            if not os.environ.get("RAY_ADDRESS"):
                ray.shutdown()

    def no_gpus(self, groups: list[Group], size: int) -> None:
        """Rows for groups whose model needs ``size`` GPUs per actor when no node with that
        many joined within the wait (``QSWEEP_GPU_WAIT_S``): never run on fewer, or on the CPU."""
        message = (f"gpus_per_actor={size}: no node with {size} GPUs joined the cluster within "
                   f"{gpu_wait_s():.0f} s (QSWEEP_GPU_WAIT_S); add such nodes (or lower gpus_per_actor) "
                   "and run again: only these cells run")
        log.warning("%s", message)
        self.record([failure_row(cell, "timeout", "preflight", message, self.sweep_hash,
                                 self.plan.prior_attempts.get(cell.cell_id, 0) + 1)
                     for group in groups for cell in group.cells])

    def expected_costs(self, groups: list[Group]) -> schedule.Costs:
        """What each group is expected to cost: timings of the store's ok rows of the same
        models (any sweep), else priors (``orchestrator.schedule.estimate``); groups whose
        quantized model the driver sees in the artifact cache pay the load alone."""
        params = {path: getattr(facts, "params", None) for path, facts in self.plan.facts.items()}
        history: list[dict[str, Any]] = []
        if self.store.files():
            import pyarrow as pa
            import pyarrow.compute as pc

            models = pa.array(sorted({g.head.model.path for g in groups}), pa.string())
            table = self.store.read(None, columns=schedule.TIMING_COLUMNS)
            table = table.filter(pc.and_(pc.equal(table["status"], "ok"),
                                         pc.is_in(table["model_path"], value_set=models)))
            history = table.select(schedule.TIMING_COLUMNS).to_pylist()
        costs = schedule.estimate(groups, params, history)
        cached = cached_groups(os.environ.get("QSWEEP_ARTIFACT_CACHE"))
        return schedule.with_cached(costs, groups, cached, params) if cached else costs

    def check_on_worker(self, pool: ActorPool) -> None:
        """Judge the pending cells on facts of a machine they will run on (a probe with the
        actors' resources); cells it skips leave the plan. When no worker can take the probe in
        time, the checks are left to the cells themselves (a missing file fails as ``data``)."""
        plan = self.plan
        probe = pool.probe(sorted({p for c in plan.pending for p, _, _ in local_paths(c)}),
                           sorted({c.model.path for c in plan.pending if plan.facts.get(c.model.path) is None}))
        if probe is None:
            return
        verdicts: dict[str, Any] = {}
        for cell in plan.pending:
            verdict = machine_verdict(cell, probe, plan.facts.get(cell.model.path))
            if verdict.skip:
                verdicts[cell.cell_id] = verdict
        if verdicts:
            plan.skipped |= verdicts
            plan.pending = [c for c in plan.pending if c.cell_id not in verdicts]
            self.skip([c for c in plan.cells if c.cell_id in verdicts], verdicts)

    def schedule(self, ray: Any, pool: ActorPool) -> None:
        """Groups onto actors until every cell has its final row."""
        spec, plan, queue = self.spec, self.plan, self.queue
        idle = pool.start_many(pool.size)
        running: dict[Any, Running] = {}
        held_model: dict[Any, str] = {}
        grown_at = time.monotonic()
        while queue or running:
            if len(queue) > len(idle) and time.monotonic() - grown_at > GROW_EVERY_S:
                grown_at = time.monotonic()  # a node that joined gets actors
                idle.extend(pool.grow(len(queue) - len(idle)))
            while idle and queue:
                actor = idle.pop()
                now = time.monotonic()
                group = schedule.dispatch(queue, self.costs, len(idle) + 1,
                                          [r.expected_left(now) for r in running.values()],
                                          held_model.get(actor))
                held_model[actor] = group.head.model.path
                stream = actor.run_group.options(num_returns="streaming").remote(
                    group, spec.retries["oom"])
                deadline = time.monotonic() + spec.timeout_s if spec.timeout_s else None
                running[stream] = Running(actor, group, list(group.cells), deadline,
                                          expected_s=self.costs.of(group))
            if queue and not running and not idle:  # no actor could be placed at all
                self.unschedulable(pool)
                idle = pool.start_many(1, required=False)
                continue
            deadlines = [r.deadline for r in running.values() if r.deadline is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            if queue:  # wake up to look for new nodes even while every running cell is long
                wait_s = GROW_EVERY_S if wait_s is None else min(wait_s, GROW_EVERY_S)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            if not ready:
                now = time.monotonic()
                for stream, run in list(running.items()):
                    if run.deadline is not None and run.deadline <= now:
                        log.warning("group %s passed timeout_s=%s; killing its actor",
                                    run.group.group_id, spec.timeout_s)
                        del running[stream]
                        _kill(ray, run.actor)
                        pool.discard(run.actor)
                        self.lost(run, "timeout", f"no result within timeout_s={spec.timeout_s}; "
                                  "the actor was killed")
                        idle.extend(pool.start_many(1, required=False))
                continue
            stream = ready[0]
            run = running[stream]
            try:
                cell_id, partial = ray.get(next(stream))
            except StopIteration:
                del running[stream]
                idle.append(run.actor)
                continue
            except ray.exceptions.RayError as exc:  # the actor died, Ray lost the object, ...
                error_class, message = ray_error(exc)
                log.warning("group %s: %s; replacing its actor", run.group.group_id, message[:200])
                del running[stream]
                _kill(ray, run.actor)
                pool.discard(run.actor)
                self.lost(run, error_class, message)
                idle.extend(pool.start_many(1, required=False))
                continue
            if spec.timeout_s:  # each stage and each cell gets timeout_s of its own
                run.deadline = time.monotonic() + spec.timeout_s
            waited, run.last_event = time.monotonic() - run.last_event, time.monotonic()
            overhead = max(0.0, waited - partial.pop("time_worker_s", waited))
            if cell_id is None:
                run.stage = partial["stage"]
                run.carried_overhead += overhead
                continue
            partial["time_overhead_s"] = overhead + run.carried_overhead
            run.carried_overhead = 0.0
            cell = next(c for c in run.remaining if c.cell_id == cell_id)
            run.remaining.remove(cell)
            run.got_any = True
            attempts = plan.prior_attempts.get(cell_id, 0) + self.tries[cell_id] + partial.pop("attempts", 1)
            self.record([complete_row(cell, partial, self.sweep_hash, attempts)])

    def unschedulable(self, pool: ActorPool) -> None:
        """No actor could be placed within its start timeout: the cells of the next group
        become rows (a ``crash`` attempt each; retried while the budget lasts)."""
        group = self.queue.pop(0)
        message = (f"no actor could be placed within {pool.start_timeout_s:.0f} s (resources "
                   f"{pool.options}); is the cluster short of nodes?")
        self.lost(Running(None, group, list(group.cells), None), "crash", message)


def ray_error(exc: Exception) -> tuple[str, str]:
    """(error class, message) of a Ray error met while streaming a group's rows."""
    name = type(exc).__name__
    text = str(exc)
    if name == "OutOfMemoryError" or "memory monitor" in text.lower():
        return "oom", f"Ray's memory monitor killed the actor ({name}): {text[:1000]}"
    if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError"):
        return "crash", f"the actor process died: {name}: {text[:1000]}"
    return "crash", f"Ray error in the actor ({name}): {text[:1000]}"


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def failure_row(cell: Cell, error_class: str, stage: str, message: str, sweep_hash: str,
                attempts: int) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    return complete_row(cell, {
        "status": "timeout" if error_class == "timeout" else "failed", "error_class": error_class,
        "error_stage": stage, "error_message": message, "started_at": now, "finished_at": now},
        sweep_hash, attempts=attempts)


def phases(groups: list[Group]) -> list[tuple[int, list[Group]]]:
    """Groups by the GPUs an actor of their model holds (``gpus_per_actor``), largest first."""
    by_size: dict[int, list[Group]] = {}
    for group in groups:
        by_size.setdefault(group.head.model.gpus_per_actor, []).append(group)
    return sorted(by_size.items(), key=lambda item: -item[0])


def gpu_wait_s() -> float:
    """How long the driver waits for GPU nodes an actor size needs: ``QSWEEP_GPU_WAIT_S``, else
    900 s on a cluster (an autoscaler may bring them) and none on an embedded Ray (nothing will)."""
    if os.environ.get("QSWEEP_GPU_WAIT_S"):
        return float(os.environ["QSWEEP_GPU_WAIT_S"])
    return 900.0 if os.environ.get("RAY_ADDRESS") else 0.0


def cached_groups(root: str | None) -> set[str]:
    """Group ids with an entry in the artifact cache at ``root`` as the driver sees it
    (``tasks.artifacts``: ``<group_id>-<device type>/report.pt``); empty where it cannot look
    (no cache, or a folder of the workers' machines only)."""
    if not root or not os.path.isdir(os.path.expanduser(root)):
        return set()
    found = set()
    with os.scandir(os.path.expanduser(root)) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith(".") and \
                    os.path.isfile(os.path.join(entry.path, "report.pt")):
                found.add(entry.name.rsplit("-", 1)[0])
    return found


def _init_ray(gpus: int | None, verbose: bool) -> None:
    """Connect to the cluster at ``RAY_ADDRESS``, or start an embedded Ray.

    Under ``ray job submit`` the job's runtime env (``cluster/runtime_env.yaml``: working_dir,
    env_vars) already reaches every actor; Ray refuses a driver runtime env that sets a
    variable the job sets too, so only the others are added here.
    """
    import ray

    address = os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": actor_env(dict(os.environ), cluster=bool(address))}
    if address:
        # A cluster knows its own GPUs: never pass num_gpus when connecting.
        if gpus is not None:
            log.warning("--gpus %s is ignored: the cluster at RAY_ADDRESS=%s has its own", gpus, address)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
            raise ConnectionError(_connect_hint(address, exc)) from exc
    else:
        # Embedded: no dashboard; Ray 2.60 turns token auth on for it.
        ray.init(address="local", num_gpus=gpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=verbose, logging_level=logging.WARNING)


def actor_env(environ: dict[str, str], cluster: bool) -> dict[str, str]:
    """The variables the driver adds to every actor's environment (see FORWARDED_ENV and
    MACHINE_ENV); those the job's own runtime env sets are left to it (Ray refuses both)."""
    named = {name.strip() for name in environ.get("QSWEEP_FORWARD_ENV", "").split(",") if name.strip()}
    wanted = FORWARDED_ENV + tuple(k for k in MACHINE_ENV if not cluster or k in named) + tuple(sorted(named))
    env = {k: environ[k] for k in wanted if k in environ and k not in SECRET_ENV}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # NVML and torch agree on device ids
    job_config = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    for key in (job_config.get("runtime_env") or {}).get("env_vars") or {}:
        env.pop(key, None)
    return env


def actor_secrets(environ: dict[str, str]) -> dict[str, str]:
    """The secrets (``SECRET_ENV``) the driver hands each actor as an argument; those the job's
    own runtime env sets are left to it."""
    job_config = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_vars = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {k: environ[k] for k in SECRET_ENV if k in environ and k not in job_vars}


def _take_secrets(secrets: dict[str, str]) -> None:
    """In an actor or task: the driver's secrets into this process's environment, where
    huggingface_hub reads ``HF_TOKEN``."""
    os.environ.update(secrets)


def _connect_hint(address: str, exc: Exception) -> str:
    """Ray 2.60 puts token authentication on a `ray start --head` cluster whenever
    ~/.ray/auth_token exists on the head (any embedded `ray.init()` creates that file), and an
    explicit RAY_ADDRESS never sends a token unless RAY_AUTH_MODE=token: the connection then
    just times out. Say so."""
    mode = os.environ.get("RAY_AUTH_MODE")
    hint = (f"cannot connect to the Ray cluster at RAY_ADDRESS={address}: {exc}. Check that it is "
            "up and reachable (`ray status --address ...`).")
    if mode != "token":
        hint += (" If the cluster uses token authentication, set RAY_AUTH_MODE=token and make its "
                 "token available here (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH=FILE or "
                 "RAY_AUTH_TOKEN); see cluster/README.md.")
    return hint


class CellActor:
    """Holds a WorkerState (the base model) across groups; imports torch only in the actor."""

    def __init__(self, threads: int | None, secrets: dict[str, str] | None = None):
        _take_secrets(secrets or {})
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        from tasks.errors import redact_logs

        redact_logs()
        from tasks.worker import WorkerState

        self.state = WorkerState(threads=threads)

    def ready(self) -> int:
        return os.getpid()

    def run_group(self, group: Group, oom_retries: int):
        """Streams ``(cell_id, partial row)`` per finished cell (``num_returns="streaming"``),
        each with ``time_worker_s``: the actor's own wall time since its previous item."""
        from tasks.errors import DeviceLost
        from tasks.worker import run_group

        mark = time.perf_counter()
        try:
            import ray

            gpus = len(ray.get_gpu_ids())
            for cell_id, row in run_group(group, self.state, oom_retries):
                row["time_worker_s"] = time.perf_counter() - mark
                if cell_id is not None:
                    row["actor_gpus"] = gpus
                yield cell_id, row
                mark = time.perf_counter()
        except DeviceLost as exc:
            # The device is unusable for this process: exit so that Ray replaces the actor; the
            # driver sees the actor die (a crash) and retries the cell on the fresh one.
            logging.getLogger(__name__).error("actor %d exits after a sticky device error: %s", os.getpid(), exc)
            logging.shutdown()
            os._exit(1)


class ActorPool:
    """One actor per GPU, each pinned to its node and asking for that node's CPUs per GPU (not
    the cluster's: a CPU-heavy head must not starve the GPU nodes of actors); without GPUs,
    ``cpu_actors`` CPU actors sharing the CPUs. The GPU slots are read again when actors are
    replaced or the pool grows, so nodes that died drop out and nodes that joined get actors."""

    def __init__(self, max_actors: int, cpu_actors: int, gpus_per_actor: int = 1):
        import ray

        self.cpu_actors = cpu_actors
        self.gpus_per_actor = gpus_per_actor
        self._remote = ray.remote(CellActor)
        self.node_of: dict[Any, str | None] = {}  # live actor -> the node it is pinned to
        self.max_actors = max_actors  # no more actors than units of work (cells) to give them
        slots = self._slots()
        self.size = min(sum(n for _, n, _ in slots), max_actors)
        self.options = self._options(slots[0])

    def _slots(self) -> list[tuple[str | None, int, int]]:
        """(node id, actors it takes, CPUs per actor) per alive node with at least
        ``gpus_per_actor`` GPUs (an actor per that many GPUs, packed per node, each asking for its
        share of that node's CPUs); [(None, cpu_actors, CPUs per actor)] on a cluster without
        GPUs (for one-GPU actors; larger ones wait for GPUs: ``wait_for_gpus``)."""
        import ray

        per = self.gpus_per_actor
        gpu_nodes = []
        for node in ray.nodes():
            resources = node.get("Resources") or {}
            gpus = int(resources.get("GPU", 0))
            if node.get("Alive") and gpus >= per:
                actors = gpus // per
                gpu_nodes.append((node["NodeID"], actors, int(resources.get("CPU", 0)) // actors))
        if gpu_nodes:
            return gpu_nodes
        n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return [(None, self.cpu_actors, max(1, n_cpus // self.cpu_actors))]

    def _options(self, slot: tuple[str | None, int, int]) -> dict[str, Any]:
        node, _, cpus = slot
        return {"num_gpus": self.gpus_per_actor, "num_cpus": cpus} if node else {"num_cpus": cpus}

    def wait_for_gpus(self, poll_s: float = 5.0) -> bool:
        """Wait (up to ``QSWEEP_GPU_WAIT_S``) until a node with ``gpus_per_actor`` GPUs is alive,
        as an autoscaler brings one; True once the pool has GPU slots (re-sized to them)."""
        deadline = time.monotonic() + gpu_wait_s()
        told = False
        while True:
            slots = self._slots()
            if slots[0][0] is not None:
                self.size = min(sum(n for _, n, _ in slots), self.max_actors)
                self.options = self._options(slots[0])
                return True
            if time.monotonic() >= deadline:
                return False
            if not told:
                log.warning("waiting up to %.0f s for a node with %d GPUs (gpus_per_actor)",
                            gpu_wait_s(), self.gpus_per_actor)
                told = True
            time.sleep(poll_s)

    def shutdown(self) -> None:
        """Kill every actor of this pool (a phase of another actor size follows)."""
        import ray

        for actor in list(self.node_of):
            _kill(ray, actor)
        self.node_of.clear()

    def _free_slots(self, count: int) -> list[tuple[str | None, int, int]]:
        """Up to ``count`` slots no live actor holds, GPU nodes filled in turn."""
        taken = Counter(self.node_of.values())
        free = []
        for slot in self._slots():
            free += [slot] * max(0, slot[1] - taken[slot[0]])
        return free[:count]

    def discard(self, actor: Any) -> None:
        self.node_of.pop(actor, None)

    def grow(self, wanted: int) -> list[Any]:
        """Actors on slots that appeared since (a node joined), up to ``wanted``."""
        free = self._free_slots(wanted)
        return self._start(free) if free else []

    @property
    def start_timeout_s(self) -> float:
        return float(os.environ.get("QSWEEP_ACTOR_START_TIMEOUT_S") or 600)

    def start_many(self, count: int, required: bool = True) -> list[Any]:
        """Start up to ``count`` actors on free slots and wait until each has imported its
        libraries, so that no timeout clock runs while an actor is still starting. Actors not up
        within the start timeout (the cluster has no room for them) are killed and left out, with
        a warning; the caller copes with fewer (``required`` is for the log line only)."""
        started = self._start(self._free_slots(count))
        if len(started) < count:
            log.warning("%d of %d %sactors started within %.0f s (resources %s)", len(started), count,
                        "" if required else "replacement ", self.start_timeout_s, self.options)
        return started

    def _start(self, slots: list[tuple[str | None, int, int]]) -> list[Any]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actors = []
        for slot in slots:
            options = self._options(slot)
            if slot[0] is not None:  # pinned: its CPU ask is that node's CPUs per GPU
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot[0], soft=False)
            actor = self._remote.options(**options).remote(max(1, options["num_cpus"]),
                                                           actor_secrets(dict(os.environ)))
            self.node_of[actor] = slot[0]
            actors.append(actor)
        pending = {a.ready.remote(): a for a in actors}
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=self.start_timeout_s) \
            if pending else ([], [])
        started = []
        for ref in ready:
            try:
                ray.get(ref)
                started.append(pending[ref])
            except ray.exceptions.RayError as exc:
                log.warning("an actor failed to start: %s", str(exc)[:500])
                self.discard(pending[ref])
                _kill(ray, pending[ref])
        for ref in late:
            self.discard(pending[ref])
            _kill(ray, pending[ref])
        return started

    def probe(self, paths: list[str], model_paths: list[str], timeout_s: float = 120) -> dict[str, Any] | None:
        """``tasks.locations.machine_facts`` on a node where this pool's actors can run, with
        the facts of models the driver could not read; None when no node took it in time."""
        import ray

        task = ray.remote(_probe).options(num_cpus=self.options["num_cpus"],
                                          num_gpus=self.options.get("num_gpus", 0))
        ref = task.remote(paths, model_paths, actor_secrets(dict(os.environ)))
        try:
            return ray.get(ref, timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as exc:
            ray.cancel(ref, force=True)
            log.warning("preflight on a worker did not run (%s): the cells' own machines check their "
                        "paths when they run", type(exc).__name__)
            return None


def _probe(paths: list[str], model_paths: list[str], secrets: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs on a worker node: what ``machine_verdict`` needs to know about it."""
    _take_secrets(secrets or {})
    from orchestrator.preflight import model_facts
    from tasks.locations import machine_facts

    facts = machine_facts(paths)
    facts["models"] = {}
    for path in model_paths:
        try:
            facts["models"][path] = model_facts(path)
        except (OSError, ValueError):
            facts["models"][path] = None
    return facts
