"""Pruning: SparseGPT and Wanda through llm-compressor 0.14's oneshot, magnitude in torch, and
the sparse-bitmask file that stores a pruned model's weights.

```yaml
methods:
  - {name: sparsegpt, sparsity: [0.5, "2:4"]}               # pruned only
  - {name: wanda, sparsity: [0.5, "2:4"]}
  - {name: magnitude, sparsity: [0.5, "2:4"]}               # data-free
  - {name: rtn, sym: false, prune: [null, {method: sparsegpt, sparsity: "2:4"}]}   # prune, then quantize
calibration: {dataset: pydoc-topics, samples: 64, seq_len: 512}
```

Which layers: every linear layer but the output head. A sparsity is a fraction of zero weights
(``0.5``) or an N:M pattern (``"2:4"``: at most N nonzero weights in every M consecutive input
columns of a row). An N:M layer whose input width M does not divide is left dense, with the
reason in its record (llm-compressor's N:M loop would prune the last partial group whole, or
fail when it is narrower than the weights to drop). How each method chooses:

- ``sparsegpt``: ``SparseGPTModifier`` (128-column blocks; the weights least costly under the
  calibration Hessian, then the rest of the row updated, OBS); llm-compressor's
  ``mask_structure`` counts the weights *pruned* per M, so N:M is passed as ``"{M-N}:{M}"``.
- ``wanda``: ``WandaPruningModifier`` (per output row, smallest ``|w| * ||x||``).
- ``magnitude``: torch, per layer the smallest ``|w|`` (over the whole weight for a fraction,
  within each group of M for N:M). llm-compressor's ``MagnitudePruningModifier`` is a training
  modifier: in ``oneshot`` (``init_sparsity = final_sparsity = 0.5, start=0, end=1``) it left
  every weight of the tiny Llama nonzero (its masks act on optimizer steps and are removed at
  finalize), and it has no N:M mask.

What is stored: compressed-tensors 0.19 and llm-compressor 0.14 no longer write sparse formats
(``ModelCompressor`` keeps only the legacy configs: "Sparse compression is no longer supported by
compressed-tensors"), so qsweep writes the pruned model in compressed-tensors' sparse-bitmask
layout itself: per pruned weight its nonzero values in the model's dtype (row-major),
``bitmask`` (one bit per weight, compressed-tensors' own ``pack_bitmasks``), ``row_offsets``
(int32) and ``shape``; every other tensor dense. ``weight_bytes`` counts that file's tensors
(``weight_bytes_source = stored``), and the file is read back and compared with the pruned
weights before the row is made. Nothing here runs a sparse kernel: the model is evaluated with
its pruned weights dense (``kernel = decompressed``), at dense speed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.configs import PruneConfig, SparseGPTConfig, nm_pattern, zero_fraction
from tasks.quantize.layers import is_head, linear_layers

log = logging.getLogger(__name__)
SPARSE_FORMAT = "sparse-bitmask"
SPARSE_KEYS = ("compressed", "bitmask", "row_offsets", "shape")


@dataclass(frozen=True)
class PrunePlan:
    name: str
    module: torch.nn.Linear
    reason: str | None  # why the layer stays dense; None = pruned


def plan_pruning(model: Any, sparsity: float | str) -> list[PrunePlan]:
    """Every linear layer (head included), pruned or left dense and why."""
    pattern = nm_pattern(sparsity)
    plans = []
    for name, module in linear_layers(model, include_head=True):
        reason = None
        if is_head(name):
            reason = "output head kept dense"
        elif pattern and module.in_features % pattern[1]:
            reason = (f"in_features={module.in_features} is not a multiple of M={pattern[1]} (N:M groups run "
                      f"along input columns): left dense")
        plans.append(PrunePlan(name, module, reason))
    return plans


def pattern_name(sparsity: float | str) -> str:
    return sparsity if isinstance(sparsity, str) else f"unstructured {sparsity:g}"


def prune(model: Any, calib: Any, method: str, cfg: PruneConfig) -> tuple[list[LayerReport], dict[str, Any]]:
    """Prune ``model`` in place with ``method``; the per-layer record (achieved sparsity, weight
    error of the pruned layer) and what the stage did."""
    plans = plan_pruning(model, cfg.sparsity)
    targets = [plan.name for plan in plans if plan.reason is None]
    # the unpruned weights for each layer's error, on the host: no second copy on the accelerator
    originals = {plan.name: plan.module.weight.detach().to("cpu", copy=True) for plan in plans if plan.reason is None}
    if not targets:
        raise ValueError(f"{method}: no layer to prune at sparsity {cfg.sparsity!r}: "
                         + "; ".join(f"{p.name}: {p.reason}" for p in plans[:3]))
    if method == "magnitude":
        engine = None
        for plan in plans:
            if plan.reason is None:
                with torch.no_grad():
                    plan.module.weight.mul_(magnitude_mask(plan.module.weight, cfg.sparsity))
    else:
        if calib is None:
            raise ValueError(f"{method} needs the cell's calibration; none was given")
        engine = _llmcompressor_prune(model, calib, method, cfg, targets)
    modules = dict(model.named_modules())
    layers = []
    for plan in plans:
        weight = modules[plan.name].weight.detach()
        error = None
        if plan.name in originals:
            original = originals.pop(plan.name).float()
            error = (torch.linalg.vector_norm(weight.float().cpu() - original)
                     / torch.linalg.vector_norm(original).clamp_min(1e-30)).item()
        layers.append(LayerReport(
            name=plan.name, in_features=plan.module.in_features, out_features=plan.module.out_features,
            quantized=False, relative_error=error, reason=plan.reason, sparsity=zeros(weight),
            sparsity_pattern=pattern_name(cfg.sparsity) if plan.reason is None else None))
    broken = [layer.name for layer in layers if layer.sparsity_pattern and not follows(
        modules[layer.name].weight, cfg.sparsity)]
    if broken:
        raise ValueError(f"{method}: {len(broken)} layers do not hold sparsity {cfg.sparsity!r} after pruning "
                         f"({', '.join(broken[:3])})")
    stage = {"stage": "prune", "method": method, "sparsity": cfg.sparsity, "engine": engine,
             "layers_pruned": len(targets), "layers_dense": len(plans) - len(targets),
             "achieved_sparsity": model_sparsity(layers)}
    if isinstance(cfg, SparseGPTConfig):
        stage["damping"] = cfg.damping
    return layers, stage


def _llmcompressor_prune(model: Any, calib: Any, method: str, cfg: PruneConfig, targets: list[str]) -> str:
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    from tasks.quantize.engines.llmcompressor import _oneshot, _version

    pattern = nm_pattern(cfg.sparsity)
    # llm-compressor's N:M counts the weights it prunes in each M: N kept = M - N pruned
    mask = f"{pattern[1] - pattern[0]}:{pattern[1]}" if pattern else "0:0"
    common = {"sparsity": zero_fraction(cfg.sparsity), "mask_structure": mask, "targets": targets}
    if method == "sparsegpt":
        modifier = SparseGPTModifier(**common, dampening_frac=cfg.damping, block_size=128)
    elif method == "wanda":
        modifier = WandaPruningModifier(**common)
    else:
        raise ValueError(f"no llm-compressor pruning for '{method}'")
    _oneshot(model, [modifier], calib.data.input_ids)
    return _version()


def magnitude_mask(weight: torch.Tensor, sparsity: float | str) -> torch.Tensor:
    """Keep-mask of magnitude pruning: the largest |w| of each N:M group, or of the whole
    weight for a fraction (ties broken by position, so exactly the fraction is pruned)."""
    scores = weight.detach().abs().float()
    pattern = nm_pattern(sparsity)
    if pattern:
        n, m = pattern
        groups = scores.reshape(scores.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.reshape(weight.shape)
    drop = int(scores.numel() * float(sparsity))
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=weight.device)
    keep[scores.flatten().topk(drop, largest=False).indices] = False
    return keep.reshape(weight.shape)


def zeros(weight: Any) -> float | None:
    """Fraction of a weight's entries that are exactly zero; None for a packed weight."""
    if not isinstance(weight, torch.Tensor) or hasattr(weight, "__tensor_flatten__") \
            or not weight.is_floating_point():
        return None
    return (weight.detach() == 0).float().mean().item()


def follows(weight: torch.Tensor, sparsity: float | str) -> bool:
    """Whether a weight holds the sparsity: at most N nonzero in every N:M group, or at least
    the fraction of zeros (less one weight in a thousand for rounding per block)."""
    pattern = nm_pattern(sparsity)
    if pattern:
        n, m = pattern
        nonzero = (weight.detach() != 0).reshape(weight.shape[0], -1, m).sum(-1)
        return bool((nonzero <= n).all())
    return zeros(weight) >= float(sparsity) - 1e-3


def model_sparsity(layers: list[LayerReport]) -> float | None:
    """Zero fraction over the linear layers but the head, weighted by their sizes."""
    counted = [(layer.sparsity, layer.in_features * layer.out_features) for layer in layers
               if layer.sparsity is not None and not is_head(layer.name)]
    total = sum(size for _, size in counted)
    return sum(s * size for s, size in counted) / total if total else None


# --- the sparse-bitmask file ---------------------------------------------------------------

def write_sparse_bitmask(model: Any, pruned: list[str], path: Path) -> dict[str, int]:
    """Write the model with the ``pruned`` layers' weights in the sparse-bitmask layout and
    every other tensor dense (tied tensors once); returns each pruned layer's stored bytes."""
    from compressed_tensors.utils.helpers import pack_bitmasks
    from safetensors.torch import save_file

    from tasks.models import tensor_key

    modules = dict(model.named_modules())
    sparse_keys = {tensor_key(modules[name].weight) for name in pruned}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if tensor_key(tensor) in seen or tensor_key(tensor) in sparse_keys:
            continue
        seen.add(tensor_key(tensor))
        tensors[key] = tensor.detach().cpu().contiguous().clone()
    stored = {}
    for name in pruned:
        weight = modules[name].weight.detach().cpu()
        mask = weight != 0
        counts = mask.sum(dim=1)
        parts = {"compressed": weight[mask].contiguous(), "bitmask": pack_bitmasks(mask),
                 "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int32),
                 "shape": torch.tensor(list(weight.shape), dtype=torch.int32)}
        tensors |= {f"{name}.weight.{part}": value for part, value in parts.items()}
        stored[name] = sum(value.numel() * value.element_size() for value in parts.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "compression": SPARSE_FORMAT})
    return stored


def read_sparse_bitmask(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors with every sparse-bitmask weight decompressed to its dense form."""
    from compressed_tensors.utils.helpers import unpack_bitmasks
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {key: value for key, value in tensors.items()
           if not any(key.endswith(f".weight.{part}") for part in SPARSE_KEYS)}
    for key in [k for k in tensors if k.endswith(".weight.shape")]:
        prefix = key.removesuffix(".shape")
        shape = tensors[key].tolist()
        mask = unpack_bitmasks(tensors[f"{prefix}.bitmask"], shape)
        values = tensors[f"{prefix}.compressed"]
        counts = mask.sum(dim=1)
        if not torch.equal((torch.cumsum(counts, 0) - counts).to(torch.int32), tensors[f"{prefix}.row_offsets"]):
            raise ValueError(f"{path}: {prefix}: row offsets do not match the bitmask")
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[mask] = values
        out[prefix] = dense
    return out


def stored_report(model: Any, layers: list[LayerReport], stage: dict[str, Any], ctx: QuantContext) -> QuantReport:
    """The report of a pruned-only model: its sparse-bitmask file written and read back (equal
    to the pruned weights, or an error), each pruned layer's stored bytes in its record."""
    pruned = [layer.name for layer in layers if layer.sparsity_pattern]
    path = Path(ctx.workdir) / SPARSE_FORMAT / "model.safetensors"
    stored = write_sparse_bitmask(model, pruned, path)
    back = read_sparse_bitmask(path)
    modules = dict(model.named_modules())
    for name in pruned:
        if not torch.equal(back[f"{name}.weight"], modules[name].weight.detach().cpu()):
            raise ValueError(f"{path}: {name}: the sparse-bitmask file does not read back as the pruned weight")
    layers = [replace(layer, stored_bytes=stored.get(layer.name)) for layer in layers]
    return QuantReport(
        weight_format=SPARSE_FORMAT, kernel="decompressed", layers=layers,
        extra={"stages": [stage], "sparse_format": SPARSE_FORMAT, "sparse_file_bytes": path.stat().st_size,
               "evaluated": "the pruned weights held dense: no sparse kernel ran (dense-matmul speed)"},
        engine=stage["engine"])


class _Pruning:
    """A pruning method: prune in place, store the result as sparse-bitmask."""

    method = ""

    def quantize(self, model: Any, calib: Any, cfg: PruneConfig, bits: int | None, group_size: int | None,
                 ctx: QuantContext) -> QuantReport:
        layers, stage = prune(model, calib, self.method, cfg)
        return stored_report(model, layers, stage, ctx)


class SparseGPT(_Pruning):
    method = "sparsegpt"


class Wanda(_Pruning):
    method = "wanda"


class Magnitude(_Pruning):
    method = "magnitude"


def after_stage(report: QuantReport, model: Any, pruned: list[LayerReport], stage: dict[str, Any]) -> QuantReport:
    """A quantization's report after a prune stage: each layer's sparsity as measured on the
    final model (a quantizer whose grid holds 0 keeps the zeros; GPTQ's error compensation and
    float zero points do not), the prune stage's pattern, and both stages in ``extra``."""
    modules = dict(model.named_modules())
    patterns = {layer.name: layer.sparsity_pattern for layer in pruned}
    layers = [replace(layer, sparsity=zeros(getattr(modules.get(layer.name), "weight", None)),
                      sparsity_pattern=patterns.get(layer.name)) for layer in report.layers]
    after = model_sparsity(layers)
    asked = [layer for layer in pruned if layer.sparsity_pattern]
    holding = [layer.name for layer in asked if isinstance(getattr(modules.get(layer.name), "weight", None), torch.Tensor)
               and zeros(modules[layer.name].weight) is not None and follows(modules[layer.name].weight, stage["sparsity"])]
    quantize = {"stage": "quantize", "achieved_sparsity": after,
                "layers_holding_pattern": f"{len(holding)} of {len(asked)}",
                "storage": f"{report.weight_format}: a code for every weight, pruned or not (no format here "
                           "stores quantized codes sparse), so the sparsity saves no bytes"}
    extra = {"stages": [stage, quantize]} | report.extra
    return replace(report, layers=layers, extra=extra)
