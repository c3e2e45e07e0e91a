"""The cell pipeline inside an actor: load → quantize → for each dataset: evaluate, profile.

Knows nothing of Ray; ``run_group`` can be called inline. It never raises for a cell's
failure: each cell comes back as a partial row (outcome, quality, size, speed, provenance)
that the driver completes with the cell's identity and writes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from orchestrator.cells import Group
from orchestrator.schema import LAYER
from tasks.artifacts import ArtifactCache
from tasks.calibration import Calibration, activation_stats, calibration_overlap, load_calibration
from tasks.errors import (
    DeviceLost,
    NonFiniteError,
    classify,
    is_sticky_device_error,
    redact,
    short_traceback,
)
from tasks.evaluate.data import check_schema
from tasks.evaluate.reference import BaselineLogprobs
from tasks.evaluate.registry import get_task
from tasks.models import copy_to, load_model, loaded_commit, model_folder, spread
from tasks.profile.columns import eval_memory_columns, speed_columns, speed_metrics
from tasks.profile.sizes import dense_weight_bytes, profile_sizes
from tasks.profile.speed import profile_speed
from tasks.profile.trackers import MemoryTracker, Timer
from tasks.quantize.base import QuantContext
from tasks.quantize.registry import get_method

log = logging.getLogger(__name__)
LAYER_FIELDS = tuple(member.name for member in LAYER)


@dataclass
class WorkerState:
    """What an actor keeps between groups: the base model of the model it last served, and that
    model's calibration windows and activation statistics per calibration spec."""

    threads: int | None = None
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    model_loads: int = 0
    calibration_runs: int = 0  # activation statistics computed (once per model and calibration spec)
    _model_key: tuple | None = None
    _prepared: dict[str, Any] = field(default_factory=dict)
    _references: dict[str, BaselineLogprobs] = field(default_factory=dict)
    _calibrations: dict[str, Calibration] = field(default_factory=dict)
    _model: Any = None
    _tokenizer: Any = None
    _offloaded: bool = False  # the base model sits in host memory while a quantized cell runs
    baseline_bytes: int | None = None  # the base model's dense weight bytes
    model_commit: str | None = None  # the hub commit of the base model's files
    artifacts: ArtifactCache | None = field(default_factory=ArtifactCache.from_env)

    def __post_init__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def base_model(self, path: str, dtype: str, trust_remote_code: bool = False,
                   revision: str | None = None) -> tuple[Any, Any]:
        key = (path, dtype, trust_remote_code, revision)
        if key != self._model_key:
            self._model = self._tokenizer = None  # free the previous model before loading
            self._calibrations.clear()
            for reference in self._references.values():
                reference.close()
            self._references.clear()
            self._model, self._tokenizer = load_model(path, dtype, self.device, trust_remote_code, revision)
            self.model_commit = loaded_commit(self._model, path)
            self._model_key = key
            self.model_loads += 1
            self.baseline_bytes = dense_weight_bytes(self._model)
        elif self._offloaded:
            self._model.to(self.device)
            self._offloaded = False
        return self._model, self._tokenizer

    def offload_base(self) -> int:
        """Move the base model off the accelerator while another model evaluates there, so that
        the cell's CUDA and NVML figures are its own; returns the bytes kept for the baseline in
        what the cell's peak figures measure: on CPU, where nothing can move, the base model and
        the baseline log-probs held in memory for KL."""
        if self._model is None:
            return 0
        if spread(self._model):  # its layers span the actor's GPUs (gpus_per_actor): it stays
            return 0
        if self.device.startswith("cuda"):
            self._model.to("cpu")
            self._offloaded = True
            torch.cuda.empty_cache()
            return 0
        from tasks.models import model_bytes

        return model_bytes(self._model) + sum(r.cached_bytes for r in self._references.values())

    def data_schema(self, cell: Any) -> str:
        """The schema the cell's data fits (``check_schema``), read once per dataset per actor."""
        key = json.dumps(["schema", cell.identity()["dataset"]], sort_keys=True, default=str)
        if key not in self._prepared:
            self._prepared[key] = check_schema(cell.dataset)
        return self._prepared[key]

    def prepared_data(self, cell: Any, tokenizer: Any) -> Any:
        """The cell's evaluation data, read and built once per dataset per actor."""
        key = json.dumps([self._model_key, cell.identity()["dataset"], cell.seed], sort_keys=True, default=str)
        if key not in self._prepared:
            task = get_task(cell.dataset.task).load()()
            self._prepared[key] = task.prepare(cell.dataset, tokenizer, cell.seed)
        return self._prepared[key]

    def reference(self, cell: Any) -> BaselineLogprobs:
        """The base model's next-token log-probs on the cell's dataset, computed once per
        dataset per actor and shared by every quantized cell (KL divergence)."""
        key = json.dumps([self._model_key, cell.identity()["dataset"], cell.seed], sort_keys=True, default=str)
        if key not in self._references:
            self._references[key] = BaselineLogprobs(self._model, spill_dir=scratch_dir())
        return self._references[key]

    def calibration(self, spec: dict[str, Any], stats: bool = True) -> Calibration:
        """Calibration windows, once per calibration spec per model, and (``stats``: only for
        methods that read them) the base model's per-layer activation statistics, computed once
        and kept on the host. They depend on neither bits nor group size."""
        key = json.dumps([self._model_key, spec], sort_keys=True, default=str)
        cached = self._calibrations.get(key)
        if cached is None:
            cached = self._calibrations[key] = Calibration(load_calibration(spec, self._tokenizer), {})
        if stats and not cached.stats:
            # one calibration's statistics resident at a time (a spec may cross several): the
            # others keep their windows, and compute their statistics again if asked
            for other, kept in self._calibrations.items():
                if kept.stats:
                    self._calibrations[other] = Calibration(kept.data, {})
            cached = self._calibrations[key] = Calibration(cached.data, activation_stats(self._model, cached.data))
            self.calibration_runs += 1
        return cached


def scratch_dir() -> Path:
    """Where quantizations write checkpoints while a group runs (removed when it ends), on the
    node's own disk: ``$QSWEEP_SCRATCH``, else the job's node-local temporary folder
    (``$SLURM_TMPDIR``, ``$TMPDIR``: a Kubernetes ``emptyDir`` is mounted there), else the
    system's (``/tmp``), never the home folder a cluster often shares over the network."""
    chosen = (os.environ.get("QSWEEP_SCRATCH") or os.environ.get("SLURM_TMPDIR")
              or str(Path(tempfile.gettempdir())))
    path = Path(chosen) / ("" if os.environ.get("QSWEEP_SCRATCH") else "qsweep-scratch")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def versions() -> str:
    import transformers

    import orchestrator

    return json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "qsweep": orchestrator.__version__},
                      sort_keys=True)


def _failure(exc: BaseException, stage: str) -> dict[str, Any]:
    """The failure columns of a row; a sticky device error is no row: it raises ``DeviceLost``
    so that the process hosting this worker exits and the cell runs again on a fresh one."""
    if is_sticky_device_error(exc):
        log.error("stage %s: sticky device error, this process cannot compute any more: %s", stage, exc)
        raise DeviceLost(redact(f"{type(exc).__name__}: {exc}")[:2000]) from exc
    return {"status": "failed", "error_class": classify(exc), "error_stage": stage,
            "error_message": redact(f"{type(exc).__name__}: {exc}")[:2000],
            "error_traceback": redact(short_traceback(exc))}


def report_columns(report: Any) -> dict[str, Any]:
    """What the method said about the quantization, beyond sizes and the per-layer record (the
    same from a fresh quantization and from the artifact cache, which keeps the report)."""
    return {"engine": report.engine, "activation_quant": report.activations,
            "quant_details": json.dumps(report.extra, sort_keys=True, default=str) if report.extra else None}


def run_group(group: Group, state: WorkerState, oom_retries: int = 2,
              ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Quantize once, then evaluate and profile each dataset.

    Yields ``(cell_id, partial row)`` as each cell finishes, so a caller (the Ray actor streams
    them) keeps every finished cell even if a later one kills the process; and once, after
    quantization, ``(None, {"stage": "evaluate"})`` so the caller knows which stage is running.
    """
    head = group.head
    info = get_method(head.method)
    common: dict[str, Any] = {
        "host": socket.gethostname(), "actor": f"{os.getpid()}@{socket.gethostname()}",
        "device": state.device, "torch_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name() if state.device == "cuda" else None,
        "versions": versions(), "started_at": _now(),
    }
    log.info("group %s: %s %s bits=%s group_size=%s, %d cells", group.group_id, head.model.name,
             head.method, head.bits, head.group_size, len(group.cells))

    stage, unusable, workdir = "load", {}, None
    try:
        for cell in group.cells:  # the data's schema before any model loads
            try:
                state.data_schema(cell)
            except Exception as exc:  # noqa: BLE001 - failures are rows
                unusable[cell.cell_id] = exc
        usable = [cell for cell in group.cells if cell.cell_id not in unusable]
        prepared = {}
        if usable:
            with Timer(state.device) as load_time:
                base, tokenizer = state.base_model(head.model.path, head.model.dtype,
                                                   head.model.trust_remote_code, head.model.revision)
            common["model_commit"] = state.model_commit
        for cell in usable:  # data before quantization: a missing dataset costs no quantize
            try:
                prepared[cell.cell_id] = state.prepared_data(cell, tokenizer)
            except Exception as exc:  # noqa: BLE001 - failures are rows
                unusable[cell.cell_id] = exc
        for cell in group.cells:
            if cell.cell_id in unusable:
                log.warning("cell %s: data: %s", cell.cell_id, unusable[cell.cell_id])
                yield cell.cell_id, {**common, **_failure(unusable[cell.cell_id], "load"),
                                     "attempts": 1, "model_loads": state.model_loads, "finished_at": _now()}
        if not prepared:
            return
        calib, calib_ids = None, None
        if head.method != "baseline":  # KL's reference, while the base model is on the accelerator
            precompute_references(group, prepared, base, state)
        caching = state.artifacts is not None and info.in_place  # the baseline is never cached
        if caching and state.device.startswith("cuda") and state.artifacts.has(group.group_id, state.device):
            state.offload_base()  # the cached copy is read onto the accelerator: the base makes room
        cached = state.artifacts.get(group.group_id, state.device) if caching else None
        if cached is not None:  # quantized by an earlier run: no calibration, no quantization
            model, report, quant_seconds = cached.model, cached.report, 0.0
            common |= cached.columns | {"artifact_cache_hit": True}
            if info.calibrated(head.params):  # tokens only, for the overlap check
                calib_ids = load_calibration(head.calibration, tokenizer).input_ids
            log.info("group %s: quantized model from the artifact cache", group.group_id)
        else:
            columns: dict[str, Any] = {}
            if info.calibrated(head.params):
                stage = "calibrate"
                with Timer(state.device) as calib_time:
                    calib = state.calibration(head.calibration, stats=info.needs_activation_stats)
                calib_ids = calib.data.input_ids
                columns |= {"calibration_tokens": calib.data.tokens, "calibration_hash": calib.data.token_hash}
                log.info("group %s: calibration %d tokens (%s) in %.1f s", group.group_id, calib.data.tokens,
                         calib.data.token_hash[:12], calib_time.seconds)
            stage = "quantize"
            workdir = Path(tempfile.mkdtemp(prefix=f"qsweep-{group.group_id[:12]}-", dir=scratch_dir()))
            model, report, quant_seconds = quantize(head, state, base, calib, workdir)
            common |= columns
            if caching:  # never fails the group: a put that cannot finish is logged and skipped
                stored = state.artifacts.put(group.group_id, model, report, columns, state.device)
                common["artifact_cache_hit"] = False if stored else None
    except Exception as exc:  # noqa: BLE001 - failures are rows
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        log.warning("group %s failed at %s: %s", group.group_id, stage, exc)
        failed = {**common, **_failure(exc, stage), "attempts": 1,
                  "model_loads": state.model_loads, "finished_at": _now()}
        for cell in group.cells:
            if cell.cell_id not in unusable:  # those have their row already
                yield cell.cell_id, dict(failed)
        return

    with Timer(state.device) as profile_time:
        common |= profile_sizes(model, report, state.baseline_bytes, head.model.dtype)
    common |= report_columns(report)
    common["layers"] = [{key: getattr(layer, key) for key in LAYER_FIELDS} for layer in report.layers]
    common |= {"time_load_s": load_time.seconds, "time_quantize_s": quant_seconds,
               "time_profile_s": profile_time.seconds}
    yield None, {"stage": "evaluate"}

    # The base leaves the accelerator while the quantized model evaluates there.
    resident = state.offload_base() if model is not base else 0
    common["resident_base_bytes"] = resident

    for cell in (c for c in group.cells if c.cell_id in prepared):
        row = dict(common)
        data, attempts = prepared[cell.cell_id], 0
        while True:
            attempts += 1
            try:
                task = get_task(cell.dataset.task).load()()
                # KL against the base model the actor keeps, unless this is that model
                compare = getattr(task, "takes_reference", False) and model is not base
                with MemoryTracker(state.device) as peak, Timer(state.device) as eval_time:
                    if compare:
                        result = task.evaluate(model, tokenizer, data, reference=state.reference(cell))
                    else:
                        result = task.evaluate(model, tokenizer, data)
                _check_metrics(result.metrics)
                row |= {
                    "status": "ok", "primary_metric": result.primary.metric,
                    "primary_value": result.primary.value, "primary_stderr": result.primary.stderr,
                    "primary_n": result.primary.n,
                    "metrics": [vars(m) for m in result.metrics],
                    "examples": [vars(e) for e in result.examples],
                    "time_evaluate_s": eval_time.seconds,
                    **eval_memory_columns(peak),
                }
                if result.task_version:
                    row["task_version"] = result.task_version
                kl = next((m.value for m in result.metrics if m.metric == "kl_divergence"), None)
                if kl is not None:
                    row["kl_divergence"] = kl
                if calib_ids is not None:
                    row["calibration_overlap"] = calibration_overlap(calib_ids, data)
                log.info("cell %s: %s=%.4f", cell.cell_id, result.primary.metric, result.primary.value)
                break
            except Exception as exc:  # noqa: BLE001 - failures are rows
                batch = getattr(data, "batch_size", None) or 1
                if classify(exc) == "oom" and attempts <= oom_retries and batch > 1:
                    log.warning("cell %s: out of memory at batch %d; retrying at %d",
                                cell.cell_id, batch, batch // 2)
                    data = replace(data, batch_size=batch // 2)
                    _free_memory(state.device)
                    continue
                log.warning("cell %s failed at evaluate: %s", cell.cell_id, exc)
                row |= _failure(exc, "evaluate")
                break
        if row.get("status") == "ok":
            try:
                with Timer(state.device) as speed_time:
                    speed = profile_speed(model, tokenizer, cell.dataset, group.profile, state.device)
                row |= {**speed_columns(speed), "metrics": row["metrics"] + speed_metrics(speed),
                        "time_profile_s": row["time_profile_s"] + speed_time.seconds}
                log.info("cell %s: ttft %.1f ms, tpot p50 %.1f ms, %.1f tok/s at batch 1 on %s", cell.cell_id,
                         row["ttft_ms"], row["tpot_p50_ms"], row["throughput_tok_s"], speed.device)
            except Exception as exc:  # noqa: BLE001 - failures are rows
                log.warning("cell %s failed at profile: %s", cell.cell_id, exc)
                row |= _failure(exc, "profile")
        row |= {"attempts": attempts, "model_loads": state.model_loads, "finished_at": _now()}
        yield cell.cell_id, row
    del model
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def quantize(head: Any, state: WorkerState, base: Any, calib: Calibration | None,
             workdir: Path) -> tuple[Any, Any, float]:
    """The quantized model of a group's head cell, its report and the seconds it took (the copy
    of the base model included): the one quantization path of sweeps and ``qsweep export``."""
    info = get_method(head.method)
    ctx = QuantContext(model_path=model_folder(head.model.path, state.model_commit), workdir=workdir,
                       device=state.device, threads=torch.get_num_threads(), seed=head.seed)
    with Timer(state.device) as quant_time:
        model = base
        if head.method != "baseline" and state.device.startswith("cuda"):
            state.offload_base()  # an engine loads its own copy, an in-place method gets one: room first
        if info.in_place:
            model = working_copy(base, state.device)
        config = info.config(**head.params)
        stage = getattr(config, "prune", None)
        if stage is not None:  # a prune stage first: the quantization sees the pruned weights
            from tasks.quantize.prune import after_stage, prune

            if not info.in_place:
                raise ValueError(f"'{head.method}' does not quantize the model it is given: it cannot follow "
                                 "a prune stage")
            pruned, stage_record = prune(model, calib, stage.method, stage.config())
        report = info.load()().quantize(model, calib, config, head.bits, head.group_size, ctx)
        if report.model is not None:  # an engine built a new (e.g. packed) model
            model = report.model
            report.model = None
        if stage is not None:
            report = after_stage(report, model, pruned, stage_record)
        _check_finite(model)
    return model, report, quant_time.seconds


def working_copy(base: Any, device: str) -> Any:
    """The copy of the base model an in-place method changes, made tensor by tensor onto
    ``device``. On an accelerator the base model has moved to host memory (``offload_base``)
    first, so the accelerator never holds two copies of the weights (an 8B model in bf16: 16 GB,
    not 32); spread over several GPUs (``gpus_per_actor``) each tensor's copy stays on its GPU;
    on the host it is a plain copy (re-reading from disk would cost the same memory and more
    time)."""
    return copy_to(base, None if spread(base) else device)


def precompute_references(group: Group, prepared: dict[str, Any], base: Any, state: WorkerState) -> None:
    """The base model's log-probs for KL, once per dataset, before any cell's timers and trackers
    (and before the base leaves the accelerator for the quantized copy)."""
    for cell in (c for c in group.cells if c.cell_id in prepared):
        task = get_task(cell.dataset.task).load()()
        if getattr(task, "takes_reference", False):
            try:
                state.reference(cell).precompute(task.reference_batches(base, prepared[cell.cell_id]))
            except Exception as exc:  # noqa: BLE001 - the cell computes what is missing, or fails as a row
                log.warning("cell %s: reference log-probs not precomputed: %s", cell.cell_id, exc)


def run_group_rows(group: Group, state: WorkerState, oom_retries: int = 2) -> dict[str, dict[str, Any]]:
    """``run_group`` for inline callers: partial rows by cell_id."""
    return {cell_id: row for cell_id, row in run_group(group, state, oom_retries) if cell_id is not None}


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _check_finite(model: Any) -> None:
    for name, p in model.named_parameters():
        if not all(torch.isfinite(part).all() for part in _finite_parts(p)):
            raise NonFiniteError(f"non-finite values in {name} after quantization")


def _finite_parts(p: torch.Tensor) -> list[torch.Tensor]:
    """What of a parameter can be checked for non-finite values: the tensor; a wrapper subclass
    (torchao), which implements no isfinite, dequantized, or where it implements no dequantize
    either (tinygemm's packed int4) its floating-point inner tensors (scales and zeros)."""
    if not hasattr(p, "__tensor_flatten__"):
        return [p]
    try:
        return [p.dequantize()]
    except NotImplementedError:
        names, _ = p.__tensor_flatten__()
        return [inner for inner in (getattr(p, n) for n in names) if inner.is_floating_point()]


def _check_metrics(metrics: list) -> None:
    for m in metrics:
        if not math.isfinite(m.value):
            raise NonFiniteError(f"metric {m.metric} is {m.value}")
