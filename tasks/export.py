"""``qsweep export CELL_ID --out DIR``: a checkpoint of a cell's quantized model that
transformers loads.

The cell is rebuilt from its row (its quantization identity: model, method and parameters,
bits, group size, calibration, seed) and quantized again through the same path a sweep uses
(``tasks.worker.quantize``), or taken from the artifact cache when the sweep ran with one.
What is written:

- a method that saved a packed checkpoint (GPTQ/AWQ format from GPTQModel, compressed-tensors
  from llm-compressor, ...) exports that checkpoint: ``format`` in ``qsweep_export.json`` says
  which;
- a method that holds its model dequantized (``rtn``, ``gsq``: ``weight_format: fake-quant``)
  exports the dequantized weights in the model's dtype (``format: dequantized``): the same
  numbers the sweep evaluated, not a smaller file;
- a pruning method (``sparsegpt``, ``wanda``, ``magnitude``) exports its pruned weights dense
  (``format: pruned-dense``, the dense size): transformers 5 with compressed-tensors 0.19 cannot
  load a sparse-bitmask checkpoint (the sweep's size counts that layout, written by qsweep); a
  prune stage before a quantization exports as that quantization does;
- a method whose packed format transformers cannot load back on this machine (``hqq``, the
  torchao engine) exports nothing and says why.

The tokenizer is saved beside the weights, and ``qsweep_export.json`` records the cell id,
group id, method, parameters, format and the per-layer record.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ExportError(Exception):
    pass


def cell_from_row(row: dict[str, Any]) -> Any:
    """The Cell a result row was produced by (its identity columns)."""
    from orchestrator.cells import Cell
    from orchestrator.spec import DatasetEntry, ModelEntry

    model = ModelEntry(name=row["model"], path=row["model_path"], dtype=row["dtype"],
                       revision=row.get("model_revision"))
    dataset = DatasetEntry(name=row["dataset"], task=row["task"], path=row["dataset_path"],
                           limit=row["limit"], settings=json.loads(row["eval_settings"] or "{}"))
    return Cell(sweep=row["sweep"], model=model, method=row["method"],
                params=json.loads(row["method_params"] or "{}"), bits=row["bits"],
                group_size=row["group_size"],
                calibration=json.loads(row["calibration"]) if row["calibration"] else None,
                dataset=dataset, seed=row["seed"])


def export_cell(row: dict[str, Any], out: Path, state: Any = None) -> dict[str, Any]:
    """Write the cell's quantized model to ``out`` (must not exist or be empty); returns the
    manifest written as ``qsweep_export.json``."""
    from tasks.quantize.registry import get_method
    from tasks.worker import WorkerState, quantize, scratch_dir

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; pass a new folder to --out")
    cell = cell_from_row(row)
    if cell.cell_id != row["cell_id"]:
        raise ExportError(f"cell {row['cell_id']}: its identity columns hash to {cell.cell_id}; the row was "
                          "written by another qsweep version, so the quantization cannot be rebuilt from it")
    info = get_method(cell.method)
    state = state or WorkerState()
    base, tokenizer = state.base_model(cell.model.path, cell.model.dtype, cell.model.trust_remote_code,
                                       cell.model.revision)
    group_id = row["group_id"]
    cached = state.artifacts.get(group_id, state.device) if state.artifacts and info.in_place else None
    workdir = Path(tempfile.mkdtemp(prefix=f"qsweep-export-{group_id[:12]}-", dir=scratch_dir()))
    try:
        if cached is not None:
            model, report = cached.model, cached.report
            log.info("export %s: quantized model from the artifact cache", cell.cell_id)
        else:
            calib = (state.calibration(cell.calibration, stats=info.needs_activation_stats)
                     if info.calibrated(cell.params) else None)
            model, report, seconds = quantize(cell, state, base, calib, workdir)
            log.info("export %s: quantized in %.1f s", cell.cell_id, seconds)
        if not report.checkpoint_dir and report.weight_format not in ("dense", "fake-quant", "sparse-bitmask"):
            raise ExportError(f"'{cell.method}' holds its model in {report.weight_format} and saves no checkpoint "
                              f"transformers can load ({info.caps(cell.params).note or 'see its registry entry'}); "
                              "nothing to export")
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
        if report.checkpoint_dir:
            shutil.copytree(report.checkpoint_dir, staging, dirs_exist_ok=True)
            fmt = report.checkpoint_format
        else:
            # Never after a forward pass: nothing here runs the model (bitsandbytes NF4 corrupts
            # a model saved after one).
            model.save_pretrained(staging)
            fmt = {"dense": "dense", "sparse-bitmask": "pruned-dense"}.get(report.weight_format, "dequantized")
        if not (staging / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(staging)
        manifest = {
            "cell_id": cell.cell_id, "group_id": group_id, "model": cell.model.name,
            "model_path": cell.model.path, "method": cell.method, "params": cell.params,
            "bits": cell.bits, "group_size": cell.group_size, "calibration": cell.calibration,
            "format": fmt, "weight_format": report.weight_format, "engine": report.engine,
            "layers": [vars(layer) for layer in report.layers],
        }
        (staging / "qsweep_export.json").write_text(json.dumps(manifest, indent=1, default=str))
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), out)
        return manifest
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
