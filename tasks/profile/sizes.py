"""Size accounting of a quantized model: weight bytes as a packed format stores them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.quantize.base import QuantReport

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class WeightSize:
    weight_bytes: int
    source: str  # "stored" | "packed-arithmetic"
    bits_per_weight: float | None  # over the quantized layers
    params_total: int
    params_quantized: int
    dense_bytes: int  # of the parts left unquantized, at the storage dtype

    @property
    def bits_per_weight_model(self) -> float | None:
        return 8 * self.weight_bytes / self.params_total if self.params_total else None


def weight_size(model: Any, report: QuantReport, storage_dtype: str | None = None) -> WeightSize:
    """Bytes of all weights: quantized layers counted as codes + scales + zeros (+ g_idx where a
    format stores it: the layer records say), the parts a method leaves unquantized at
    ``storage_dtype`` (the baseline's dtype: whatever an engine computes them in, they compare
    across engines), tied tensors once. Every parameter but the bias of a quantized layer's
    module is counted by the arithmetic, whatever the module calls it (``weight``, HQQ's ``W_q``).
    Parameters count the same for every format: the dense parts' elements plus each quantized
    layer's in x out weights (a packed module's buffers, padding, are not weights)."""
    from tasks.models import tensor_bytes, tensor_key

    quantized = {layer.name: layer for layer in report.quantized_layers}
    # weights a sparse format stores (values, bitmask, offsets): their bytes as counted in its file
    sparse = {layer.name: layer for layer in report.layers if not layer.quantized and layer.stored_bytes is not None}
    modules = dict(model.named_modules())
    quantized_keys = {tensor_key(p) for name in quantized if name in modules
                      for pname, p in modules[name].named_parameters() if pname != "bias"}
    quantized_keys |= {tensor_key(modules[name].weight) for name in sparse if name in modules}
    per_element = DTYPE_BYTES.get(storage_dtype or "")
    seen, dense_bytes, dense_params = set(), 0, 0
    for p in model.parameters():
        if tensor_key(p) in seen:
            continue
        seen.add(tensor_key(p))
        if tensor_key(p) not in quantized_keys:
            dense_params += p.numel()
            dense_bytes += p.numel() * per_element if per_element and p.is_floating_point() else tensor_bytes(p)
    packed_bits = sum(layer.stored_bits() for layer in quantized.values())
    logical = sum(layer.in_features * layer.out_features for layer in quantized.values())
    sparse_bytes = sum(layer.stored_bytes for layer in sparse.values())
    sparse_params = sum(layer.in_features * layer.out_features for layer in sparse.values())
    bits_per_weight = report.bits_per_weight()
    if sparse and not quantized:  # a pruned model: bits per weight of its sparse-stored layers
        bits_per_weight = 8 * sparse_bytes / sparse_params
    return WeightSize(
        weight_bytes=dense_bytes + (packed_bits + 7) // 8 + sparse_bytes,
        source="stored" if report.weight_format == "dense" or sparse and not quantized else "packed-arithmetic",
        bits_per_weight=bits_per_weight,
        params_total=dense_params + logical + sparse_params,
        params_quantized=logical,
        dense_bytes=dense_bytes,
    )


def dense_weight_bytes(model: Any) -> int:
    """Bytes of a dense model's parameters (tied tensors once): the baseline of compression."""
    from tasks.models import tensor_bytes, tensor_key

    seen, total = set(), 0
    for p in model.parameters():
        if tensor_key(p) not in seen:
            seen.add(tensor_key(p))
            total += tensor_bytes(p)
    return total


def profile_sizes(model: Any, report: QuantReport, baseline_bytes: int | None = None,
                  storage_dtype: str | None = None) -> dict[str, Any]:
    """Size columns of a row: weight bytes, bits per weight, layer counts, format, kernel."""
    from tasks.models import model_bytes

    size = weight_size(model, report, storage_dtype)
    quantized = report.quantized_layers
    baseline = baseline_bytes or dense_weight_bytes(model)
    return {
        "weight_bytes": size.weight_bytes, "weight_bytes_source": size.source,
        "baseline_weight_bytes": baseline,
        "compression_ratio": baseline / size.weight_bytes if size.weight_bytes else None,
        "checkpoint_format": report.checkpoint_format, "checkpoint_bytes": report.checkpoint_bytes,
        "bits_per_weight": size.bits_per_weight, "bits_per_weight_model": size.bits_per_weight_model,
        "dense_parts_dtype": storage_dtype, "params_total": size.params_total,
        "params_quantized": size.params_quantized, "layers_quantized": len(quantized),
        "layers_fallback": sum(1 for layer in quantized if layer.fallback),
        "layers_high_precision": sum(1 for layer in report.layers if not layer.quantized),
        "fallback": report.fallback, "weight_format": report.weight_format,
        "kernel": report.kernel, "model_bytes_in_memory": model_bytes(model),
        "compute_dtype": compute_dtype(model), **sparsity_columns(report),
    }


def sparsity_columns(report: QuantReport) -> dict[str, Any]:
    """``sparsity`` (zero fraction over the linear layers but the head, as evaluated) and
    ``sparse_format`` of a cell that pruned; nothing for one that did not."""
    from tasks.quantize.prune import model_sparsity

    if not any(layer.sparsity_pattern for layer in report.layers):
        return {}
    stored = any(layer.stored_bytes is not None for layer in report.layers)
    return {"sparsity": model_sparsity(report.layers),
            "sparse_format": report.extra.get("sparse_format") if stored else None}


def compute_dtype(model: Any) -> str | None:
    """The dtype the model's unquantized parts compute in (an engine may change it, e.g. GPTQModel's
    CPU kernels run in bfloat16 whatever the spec's dtype)."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None
