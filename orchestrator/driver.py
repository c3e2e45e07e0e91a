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

from orchestrator.cells import Cell, Group, expand, group_cells, identity_columns
from orchestrator.preflight import check
from orchestrator.spec import Spec
from orchestrator.store import Store

log = logging.getLogger(__name__)

FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "QSWEEP_CACHE",
                 "TRANSFORMERS_OFFLINE")
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


def make_plan(spec: Spec, store: Store | None) -> Plan:
    cells = expand(spec)
    existing = {}
    if store is not None and store.files(spec.name):
        table = store.read(spec.name, columns=["cell_id", "status", "error_message"])
        existing = {r["cell_id"]: r for r in table.to_pylist()}
    done = {cid for cid, r in existing.items() if r["status"] in DONE_STATUSES}
    skipped, notes, pending, widths = {}, {}, [], {}
    for cell in cells:
        verdict = check(cell, widths)
        if verdict.note:
            notes[cell.cell_id] = verdict.note
        if verdict.skip:
            skipped[cell.cell_id] = verdict
        elif cell.cell_id not in done:
            pending.append(cell)
    return Plan(cells=cells, done=done, skipped=skipped, notes=notes, pending=pending)


def complete_row(cell: Cell, partial: dict[str, Any], sweep_hash: str, attempts: int) -> dict[str, Any]:
    return {**identity_columns(cell), "spec_hash": sweep_hash, "attempts": attempts, **partial}


def skipped_row(cell: Cell, verdict: Any, sweep_hash: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    return complete_row(cell, {
        "status": "skipped", "error_class": verdict.error_class, "error_stage": "preflight",
        "error_message": verdict.reason, "host": socket.gethostname(), "started_at": now,
        "finished_at": now}, sweep_hash, attempts=0)


def crash_rows(group: Group, exc: BaseException, sweep_hash: str) -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.timezone.utc)
    return [complete_row(cell, {
        "status": "failed", "error_class": "crash", "error_stage": "load",
        "error_message": f"the actor process died: {type(exc).__name__}: {str(exc)[:1500]}",
        "started_at": now, "finished_at": now}, sweep_hash, attempts=1) for cell in group.cells]


@dataclass
class RunResult:
    ran: int
    rows_written: int
    statuses: Counter
    wall_s: float


def run_sweep(spec: Spec, store: Store, gpus: int | None = None, cpu_actors: int | None = None,
              progress: bool = True, verbose: bool = False) -> RunResult:
    """Run every cell of ``spec`` that has no ``ok`` row in ``store``."""
    started = time.perf_counter()
    store.check_writable(spec.name)
    plan = make_plan(spec, store)
    sweep_hash = spec_hash(spec)
    statuses: Counter = Counter()

    existing_skips = set()
    if plan.skipped and store.files(spec.name):
        table = store.read(spec.name, columns=["cell_id", "status", "error_message"])
        existing_skips = {(r["cell_id"], r["error_message"]) for r in table.to_pylist() if r["status"] == "skipped"}
    skip_rows = [skipped_row(c, plan.skipped[c.cell_id], spec_hash(spec)) for c in plan.cells
                 if c.cell_id in plan.skipped
                 and (c.cell_id, plan.skipped[c.cell_id].reason) not in existing_skips]
    store.write_rows(skip_rows)
    statuses["skipped"] += len(skip_rows)

    groups = group_cells(plan.pending)
    if not groups:
        return RunResult(ran=0, rows_written=len(skip_rows), statuses=statuses,
                         wall_s=time.perf_counter() - started)

    import ray
    from tqdm import tqdm

    _init_ray(gpus, verbose)
    try:
        pool = ActorPool(len(groups), cpu_actors or spec.cpu_actors)
        actors = [pool.start() for _ in range(pool.size)]
        bar = tqdm(total=len(plan.pending), unit="cell", desc=f"sweep {spec.name}", disable=not progress)
        queue = list(groups)
        running: dict[Any, tuple[Any, Group]] = {}
        last_model: dict[Any, str] = {}
        idle = list(actors)
        written = len(skip_rows)
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                group = _next_group(queue, last_model.get(actor))
                last_model[actor] = group.head.model.path
                running[actor.run_group.remote(group)] = (actor, group)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, group = running.pop(ready[0])
            try:
                partials = ray.get(ready[0])
                rows = [complete_row(c, partials[c.cell_id], sweep_hash, attempts=1) for c in group.cells]
                idle.append(actor)
            except ray.exceptions.RayActorError as exc:
                log.warning("actor died running group %s; replacing it", group.group_id)
                rows = crash_rows(group, exc, sweep_hash)
                idle.append(pool.start())
            store.write_rows(rows)
            written += len(rows)
            statuses.update(r["status"] for r in rows)
            bar.update(len(rows))
            bar.set_postfix({k: v for k, v in statuses.items() if v})
        bar.close()
    finally:
        if not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
    return RunResult(ran=len(plan.pending), rows_written=written, statuses=statuses,
                     wall_s=time.perf_counter() - started)


def _next_group(queue: list[Group], model_path: str | None) -> Group:
    """Prefer a group of the model this actor already holds."""
    for i, group in enumerate(queue):
        if group.head.model.path == model_path:
            return queue.pop(i)
    return queue.pop(0)


def _init_ray(gpus: int | None, verbose: bool) -> None:
    import ray

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # NVML and torch agree on device ids
    runtime_env = {"env_vars": env}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster knows its own GPUs: never pass num_gpus when connecting.
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose)
    else:
        ray.init(address="local", num_gpus=gpus, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=verbose, logging_level=logging.WARNING)


class CellActor:
    """Holds a WorkerState (the base model) across groups; imports torch only in the actor."""

    def __init__(self, threads: int | None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        from tasks.worker import WorkerState

        self.state = WorkerState(threads=threads)

    def run_group(self, group: Group) -> dict[str, dict[str, Any]]:
        from tasks.worker import run_group

        return run_group(group, self.state)


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

    def start(self) -> Any:
        return self._remote.options(**self.options).remote(self.options["num_cpus"])
