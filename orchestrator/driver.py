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
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from orchestrator.cells import Cell, Group, expand, group_cells, identity_columns, rerun_ids
from orchestrator.preflight import check, host_memory_bytes, validate_models
from orchestrator.spec import Spec
from orchestrator.store import Store

log = logging.getLogger(__name__)

FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "QSWEEP_CACHE",
                 "TRANSFORMERS_OFFLINE", "QSWEEP_ARTIFACT_CACHE", "QSWEEP_ARTIFACT_CACHE_GB",
                 "QSWEEP_SCRATCH", "QSWEEP_REFERENCE_CACHE_MB")
DONE_STATUSES = ("ok",)


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


def make_plan(spec: Spec, store: Store | None, rerun: list[dict[str, list]] | None = None) -> Plan:
    """What to run: every cell without a done row, and those ``rerun`` rules (see
    ``orchestrator.cells.parse_rerun``) ask for again; preflight verdicts for all."""
    cells = expand(spec)
    facts = validate_models(spec)
    memory = host_memory_bytes()
    existing = {}
    if store is not None and store.files(spec.name):
        table = store.read(spec.name, columns=["cell_id", "status", "error_message", "attempts"])
        existing = {r["cell_id"]: r for r in table.to_pylist()}
    done = {cid for cid, r in existing.items() if r["status"] in DONE_STATUSES} - rerun_ids(rerun or [], cells)
    skipped, notes, pending, verdicts = {}, {}, [], {}
    for cell in cells:
        # A verdict depends on these alone (the dataset by its path): decide once per combination.
        key = (cell.model.path, cell.model.dtype, cell.method, cell.params_canonical or str(cell.params), cell.bits,
               cell.group_size, cell.dataset.path,
               (cell.calibration or {}).get("dataset"))
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = check(cell, facts[cell.model.path], memory)
        if verdict.note:
            notes[cell.cell_id] = verdict.note
        if verdict.skip:
            skipped[cell.cell_id] = verdict
        elif cell.cell_id not in done:
            pending.append(cell)
    prior = {c.cell_id: existing[c.cell_id]["attempts"] or 0 for c in pending if c.cell_id in existing}
    on_record = {(cid, r["error_message"]) for cid, r in existing.items() if r["status"] == "skipped"}
    return Plan(cells=cells, done=done, skipped=skipped, notes=notes, pending=pending,
                prior_attempts=prior, skips_on_record=on_record)


def complete_row(cell: Cell, partial: dict[str, Any], sweep_hash: str, attempts: int) -> dict[str, Any]:
    return {**identity_columns(cell), "spec_hash": sweep_hash, "attempts": attempts, **partial}


def skipped_row(cell: Cell, verdict: Any, sweep_hash: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    return complete_row(cell, {
        "status": "skipped", "error_class": verdict.error_class, "error_stage": "preflight",
        "error_message": verdict.reason, "host": socket.gethostname(), "started_at": now,
        "finished_at": now}, sweep_hash, attempts=0)


@dataclass
class RunResult:
    ran: int
    rows_written: int
    statuses: Counter
    wall_s: float


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


def run_sweep(spec: Spec, store: Store, gpus: int | None = None, cpu_actors: int | None = None,
              progress: bool = True, verbose: bool = False,
              rerun: list[dict[str, list]] | None = None) -> RunResult:
    """Run every cell of ``spec`` that has no ``ok`` row in ``store``.

    Rows stream back cell by cell and are written as they arrive, so killing the driver or an
    actor loses at most the cells in flight. A dead actor (``crash``) or a cell past
    ``timeout_s`` (the actor is killed: Ray cannot cancel a running method) is retried on a
    fresh actor up to ``retries``; then its row records what happened. Cells matching a
    ``rerun`` rule run again even when done; their new row supersedes the old (newest wins).
    """
    started = time.perf_counter()
    store.check_writable(spec.name)
    plan = make_plan(spec, store, rerun)
    sweep_hash = spec_hash(spec)
    statuses: Counter = Counter()

    skip_rows = [skipped_row(c, plan.skipped[c.cell_id], sweep_hash) for c in plan.cells
                 if c.cell_id in plan.skipped
                 and (c.cell_id, plan.skipped[c.cell_id].reason) not in plan.skips_on_record]
    store.write_rows(skip_rows)
    statuses.update(r["status"] for r in skip_rows)

    groups = group_cells(plan.pending)
    if not groups:
        return RunResult(ran=0, rows_written=len(skip_rows), statuses=statuses,
                         wall_s=time.perf_counter() - started)

    import ray
    from tqdm import tqdm

    _init_ray(gpus, verbose)
    written = len(skip_rows)
    try:
        pool = ActorPool(len(groups), cpu_actors or spec.cpu_actors)
        idle = pool.start_many(pool.size)
        bar = tqdm(total=len(plan.pending), unit="cell", desc=f"sweep {spec.name}", disable=not progress)
        queue = list(groups)
        running: dict[Any, Running] = {}
        held_model: dict[Any, str] = {}
        tries: Counter = Counter()  # attempts per cell ended by a crash or a timeout

        def record(rows: list[dict[str, Any]]) -> None:
            nonlocal written
            store.write_rows(rows)
            written += len(rows)
            statuses.update(r["status"] for r in rows)
            bar.update(len(rows))
            bar.set_postfix({k: v for k, v in statuses.items() if v})

        def lost(run: Running, error_class: str, message: str) -> None:
            """The actor is gone mid-group: blame the cell in flight (all remaining ones if
            it died loading or quantizing) and write its row at once, so the store knows even if the
            driver dies next; retry within budget (the retry's row replaces it); requeue the
            rest."""
            blamed = run.remaining if run.stage == "quantize" else run.remaining[:1]
            final, interim = [], []
            for cell in blamed:
                tries[cell.cell_id] += 1
                row = failure_row(cell, error_class, run.stage, message, sweep_hash,
                                  plan.prior_attempts.get(cell.cell_id, 0) + tries[cell.cell_id])
                (final if tries[cell.cell_id] > spec.retries[error_class] else interim).append(row)
            store.write_rows(interim)
            record(final)
            done = {r["cell_id"] for r in final}
            rest = tuple(c for c in run.remaining if c.cell_id not in done)
            if rest:
                queue.insert(0, Group(group_id=run.group.group_id, cells=rest))

        while queue or running:
            while idle and queue:
                actor = idle.pop()
                group = _next_group(queue, held_model.get(actor))
                held_model[actor] = group.head.model.path
                stream = actor.run_group.options(num_returns="streaming").remote(
                    group, spec.retries["oom"])
                deadline = time.monotonic() + spec.timeout_s if spec.timeout_s else None
                running[stream] = Running(actor, group, list(group.cells), deadline)
            deadlines = [r.deadline for r in running.values() if r.deadline is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            if not ready:
                now = time.monotonic()
                for stream, run in list(running.items()):
                    if run.deadline is not None and run.deadline <= now:
                        log.warning("group %s passed timeout_s=%s; killing its actor",
                                    run.group.group_id, spec.timeout_s)
                        del running[stream]
                        ray.kill(run.actor, no_restart=True)
                        lost(run, "timeout", f"no result within timeout_s={spec.timeout_s}; "
                             "the actor was killed")
                        idle.extend(pool.start_many(1))
                continue
            stream = ready[0]
            run = running[stream]
            try:
                cell_id, partial = ray.get(next(stream))
            except StopIteration:
                del running[stream]
                idle.append(run.actor)
                continue
            except ray.exceptions.RayActorError as exc:
                log.warning("actor died running group %s; replacing it", run.group.group_id)
                del running[stream]
                lost(run, "crash", f"the actor process died: {type(exc).__name__}: {str(exc)[:1000]}")
                idle.extend(pool.start_many(1))
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
            attempts = plan.prior_attempts.get(cell_id, 0) + tries[cell_id] + partial.pop("attempts", 1)
            record([complete_row(cell, partial, sweep_hash, attempts)])
        bar.close()
    finally:
        if not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
    store.compact(spec.name)
    return RunResult(ran=len(plan.pending), rows_written=written, statuses=statuses,
                     wall_s=time.perf_counter() - started)


def failure_row(cell: Cell, error_class: str, stage: str, message: str, sweep_hash: str,
                attempts: int) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    return complete_row(cell, {
        "status": "timeout" if error_class == "timeout" else "failed", "error_class": error_class,
        "error_stage": stage, "error_message": message, "started_at": now, "finished_at": now},
        sweep_hash, attempts=attempts)


def _next_group(queue: list[Group], model_path: str | None) -> Group:
    """Prefer a group of the model this actor already holds."""
    for i, group in enumerate(queue):
        if group.head.model.path == model_path:
            return queue.pop(i)
    return queue.pop(0)


def _init_ray(gpus: int | None, verbose: bool) -> None:
    """Connect to the cluster at ``RAY_ADDRESS``, or start an embedded Ray.

    Under ``ray job submit`` the job's runtime env (``cluster/runtime_env.yaml``: working_dir,
    env_vars) already reaches every actor; Ray refuses a driver runtime env that sets a
    variable the job sets too, so only the others are added here.
    """
    import ray

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # NVML and torch agree on device ids
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    for key in (job_config.get("runtime_env") or {}).get("env_vars") or {}:
        env.pop(key, None)
    runtime_env = {"env_vars": env}
    address = os.environ.get("RAY_ADDRESS")
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

    def __init__(self, threads: int | None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        from tasks.worker import WorkerState

        self.state = WorkerState(threads=threads)

    def ready(self) -> int:
        return os.getpid()

    def run_group(self, group: Group, oom_retries: int):
        """Streams ``(cell_id, partial row)`` per finished cell (``num_returns="streaming"``),
        each with ``time_worker_s``: the actor's own wall time since its previous item."""
        from tasks.worker import run_group

        mark = time.perf_counter()
        for cell_id, row in run_group(group, self.state, oom_retries):
            row["time_worker_s"] = time.perf_counter() - mark
            yield cell_id, row
            mark = time.perf_counter()


class ActorPool:
    """One actor per GPU, or ``cpu_actors`` CPU actors sharing the CPUs."""

    def __init__(self, n_groups: int, cpu_actors: int):
        import ray

        resources = ray.cluster_resources()
        n_gpus = int(resources.get("GPU", 0))
        n_cpus = max(1, int(resources.get("CPU", 1)))
        if n_gpus:
            self.size = min(n_gpus, n_groups)
            self.options = {"num_gpus": 1, "num_cpus": max(1, n_cpus // n_gpus)}
        else:
            self.size = min(cpu_actors, n_groups)
            self.options = {"num_cpus": max(1, n_cpus // self.size)}
        self._remote = ray.remote(CellActor)

    def start_many(self, count: int, timeout_s: float = 600) -> list[Any]:
        """Start actors and wait until each has imported its libraries, so that no timeout
        clock runs while an actor is still starting."""
        import ray

        actors = [self._remote.options(**self.options).remote(self.options["num_cpus"])
                  for _ in range(count)]
        ray.get([a.ready.remote() for a in actors], timeout=timeout_s)
        return actors
