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
from tasks.errors import AccessError, DataError, access_advice, hub_refusal
from tasks.locations import is_local, kind

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


def load_model(path: str, dtype: str, device: str, trust_remote_code: bool = False,
               revision: str | None = None) -> tuple[Any, Any]:
    """Model (eval mode, on ``device``) and tokenizer (``loaded_commit`` tells the commit of a
    hub id's files). Remote code runs only when the spec's model entry sets ``trust_remote_code: true``.

    A hub id loads through transformers' own cache: with ``HF_HUB_OFFLINE=1`` a model fetched
    before (``qsweep fetch``) loads from there; ``HF_TOKEN`` is read by the hub client itself.
    A refusal by the hub (gated, private, bad token) raises ``AccessError`` with what to do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_model_path(path)
    hub = kind(path) == "hub"
    if hub and os.environ.get("HF_HUB_OFFLINE") != "1":
        check_cache_locks()
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if hub and revision:
        options["revision"] = revision
    placement = device_map(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, **options)
        model = AutoModelForCausalLM.from_pretrained(local, dtype=getattr(torch, DTYPES[dtype]),
                                                     **options, **placement)
    except Exception as exc:
        refusal = hub_refusal(exc) if hub else None
        if refusal:
            raise AccessError(access_advice("model", path, refusal)) from None
        if hub and os.environ.get("HF_HUB_OFFLINE") == "1" and isinstance(exc, OSError):
            raise DataError(f"model {path}{'@' + revision if revision else ''} is not in the hub cache "
                            f"({hub_cache()}) and HF_HUB_OFFLINE=1: run `qsweep fetch SPEC` where the hub "
                            "can be reached (with --to DIR on shared storage, then HF_HUB_CACHE=DIR/hub "
                            "here)") from exc
        raise
    if not placement:
        model.to(device)
    model.eval()
    return model, tokenizer


def device_map(device: str) -> dict[str, Any]:
    """How transformers places the weights as it reads them: straight onto the GPU (no whole
    copy in host memory first: eight actors of a node loading a 70B model would hold eight),
    and across every GPU the actor holds (``gpus_per_actor`` > 1: ``device_map="auto"``, layer
    by layer in order); nothing on the CPU (loaded there, then ``.to``)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"device_map": "auto" if torch.cuda.device_count() > 1 else device}


def spread(model: Any) -> bool:
    """Whether the model's layers are spread over several devices (``device_map="auto"``)."""
    placed = getattr(model, "hf_device_map", None) or {}
    return len({str(d) for d in placed.values()}) > 1


# The files of a hub model that loading and quantizing read (weights, configs, tokenizer, remote
# code): what a worker resolves to a local folder and what ``qsweep fetch`` downloads.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def model_folder(path: str, commit: str | None) -> str:
    """A local folder of the model's files, for engines that read a checkpoint from disk: a hub
    id resolves to its cached snapshot of ``commit`` (the one that loaded: nothing new is
    downloaded, and it works offline)."""
    if kind(path) != "hub":
        return resolve_model_path(path)
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=commit, allow_patterns=MODEL_FILES)


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_cache_locks(cache: Path | None = None) -> None:
    """Actors that load the same hub model at once download it once: huggingface_hub takes a
    ``flock`` per file in the hub cache and the others wait, then read the finished file. A
    filesystem without ``flock`` (some NFS and Lustre mounts) cannot serialise them: say so
    before any download starts, and how to download once instead (``qsweep fetch``, then offline:
    reading the cache takes no lock)."""
    cache = cache or hub_cache()
    cache.mkdir(parents=True, exist_ok=True)
    probe = cache / f".qsweep-flock-probe-{os.getpid()}"
    try:
        with open(probe, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError as exc:
        raise DataError(f"the hub cache {cache} is on a filesystem without flock ({exc.strerror}): "
                        "concurrent actors cannot share downloads there. Download once with `qsweep "
                        "fetch SPEC --to DIR` and run with HF_HUB_CACHE=DIR/hub HF_HUB_OFFLINE=1 (the "
                        "cache is then only read), or point HF_HUB_CACHE at a filesystem with flock") from None
    finally:
        probe.unlink(missing_ok=True)


def loaded_commit(model: Any, path: str) -> str | None:
    """The hub commit of the files ``model`` was loaded from (also from the cache offline:
    transformers reads it from the snapshot's folder name); None for local and catalogued ones."""
    return getattr(model.config, "_commit_hash", None) if kind(path) == "hub" else None


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


def copy_to(module: Any, device: str | None) -> Any:
    """A deep copy of ``module`` whose parameters and buffers are on ``device`` (None: each
    where it is), made tensor by tensor (no second whole copy on either side; tied tensors stay
    tied). The quantized copy of a base model kept on the host goes to the accelerator this way."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in memo:
            continue
        moved = tensor.detach().to(device or tensor.device, copy=True)
        memo[id(tensor)] = (torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else moved)
    return copy.deepcopy(module, memo)
