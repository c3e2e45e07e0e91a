"""Load a model and its tokenizer from a local directory, a hub id, or the catalogue.

A catalogued model (``tasks.catalog``) is converted once from its packaged GGUF into a normal
Hugging Face folder under the cache directory (``$QSWEEP_CACHE``, default
``~/.cache/qsweep``) and loaded from there afterwards. Conversion is guarded by a file lock and
lands by an atomic rename, so concurrent actors never see a half-written folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.catalog import KNOWN_MODELS
from tasks.errors import DataError
from tasks.locations import is_local

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def cache_dir() -> Path:
    return Path(os.environ.get("QSWEEP_CACHE", Path.home() / ".cache" / "qsweep")).expanduser()


def resolve_model_path(path: str) -> str:
    """A local directory (``~`` expanded, on the machine that loads it) or hub id to load from;
    ``known:<name>`` is prepared on first use."""
    if path.startswith("known:"):
        return str(prepare_known_model(path.removeprefix("known:")))
    return str(Path(path).expanduser()) if is_local(path) else path


def prepare_known_model(name: str) -> Path:
    known = KNOWN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(known.package)
    if spec is None or spec.origin is None:
        raise DataError(f"model '{name}' needs the package '{known.package}': {known.install}")
    source_dir = Path(spec.origin).parent
    if not (source_dir / known.gguf_file).is_file():
        raise DataError(f"model '{name}': {source_dir / known.gguf_file} is missing; reinstall with {known.install}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another actor converted it meanwhile
            return target
        log.info("converting %s from %s (once)", name, known.gguf_file)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=known.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=known.gguf_file,
                                                     dtype="float32")
        # The GGUF weights are already dequantized to float32 here; save them as a plain folder.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        tmp = target.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def load_model(path: str, dtype: str, device: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Model (eval mode, on ``device``) and tokenizer. Remote code runs only when the spec's
    model entry sets ``trust_remote_code: true``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_model_path(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(local).is_dir():
        raise DataError(f"model path {local!r} is not a local directory and HF_HUB_OFFLINE=1; "
                        "give a local directory or allow hub access")
    tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=getattr(torch, DTYPES[dtype]),
                                                 trust_remote_code=trust_remote_code)
    model.to(device)
    model.eval()
    return model, tokenizer


def tensor_key(tensor: Any) -> int:
    """What de-duplicates tied tensors: the storage address, or for a wrapper tensor subclass
    without storage of its own (torchao's ``Int8Tensor``: ``data_ptr() == 0``) the object."""
    return tensor.data_ptr() or id(tensor)


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds; a wrapper subclass holds its inner tensors (torchao's int8 codes,
    scales and zero points), not ``numel`` elements of its outer dtype."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_bytes(model: Any) -> int:
    """Bytes of parameters and buffers as held in memory (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor_key(tensor) in seen:
            continue
        seen.add(tensor_key(tensor))
        total += tensor_bytes(tensor)
    return total


def count_params(model: Any) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if tensor_key(p) not in seen:
            seen.add(tensor_key(p))
            total += p.numel()
    return total
