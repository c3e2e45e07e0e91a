"""Checks before any GPU time, from model configs (never weights), files and memory.

- Spec-level problems (``spec_problems``): a group size that divides none of a model's layer
  widths is an error (every layer would take the fallback); ``qsweep plan`` exits 2.
- Cell-level verdicts (``check``): a cell that cannot run — missing model directory, dataset
  or calibration file, a group size the method cannot fall back from, more memory than the
  host has — becomes a ``skipped`` row with its reason, never a crash; cells that will run
  with a fallback get a note. Only cells without an ok row are judged (an ok row is final).
- Where: spec-level facts (method capabilities, shapes from a config the driver can read) are
  judged on the driver; facts of the machines cells run on (model directories, data files,
  memory) are judged where the cells will run: ``qsweep run`` gathers them with a probe on a
  worker (``machine_verdict`` over ``tasks.locations.machine_facts``), ``qsweep plan`` on its
  own host and says so. A method whose kernel is CUDA-only (``Capabilities.requires_cuda``) is
  judged on the worker too: skipped where it has no GPU. Each verdict carries ``where`` (the
  row's ``checked_on``).

Model facts come from ``config.json`` of a local directory, from the GGUF header of a
catalogued model, or for a hub id from its ``config.json`` on the hub (or in the hub cache) and
its safetensors headers; when none is at hand the checks are deferred (a note says so).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orchestrator.cells import Cell
from orchestrator.spec import Spec, SpecError
from tasks.catalog import KNOWN_MODELS
from tasks.locations import is_local, kind, path_kinds
from tasks.quantize.layers import non_divisible
from tasks.quantize.registry import get_method

WIDTH_KEYS = ("hidden_size", "intermediate_size")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                     "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ModelFacts:
    widths: dict[str, int]  # input widths of the linear layers, by config key
    params: int | None  # parameter count, when known without loading weights
    layers: int | None = None  # decoder blocks
    vocab: int | None = None
    kv_width: int | None = None  # key/value heads x head dim: one token's K (or V) in one block
    # the linear layers of the decoder blocks by module name, in block order, from the weights'
    # headers (the sensitivity study's units); empty when no header was at hand
    linear_names: tuple[str, ...] = ()


# A decoder block's linear weight: ``<container>.<block>.<path>.weight``, 2-D (norms are 1-D).
BLOCK_WEIGHT = re.compile(r"^(?P<container>.+?)\.(?P<block>\d+)\.(?P<path>.+)\.weight$")
# llama.cpp's tensor names of a Llama-architecture GGUF, as transformers names the modules
GGUF_LINEAR = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def linear_names(shapes: dict[str, list[int]]) -> tuple[str, ...]:
    """Module names of the decoder blocks' linear layers from tensor names and shapes: 2-D
    ``*.weight`` tensors inside a numbered block, in block order (embeddings, norms and the head
    are outside the blocks or 1-D)."""
    found = []
    for name, shape in shapes.items():
        match = BLOCK_WEIGHT.match(name)
        if match and len(shape) == 2 and "embed" not in match["path"] and "norm" not in match["path"]:
            found.append((match["container"], int(match["block"]), match["path"]))
    return tuple(f"{c}.{b}.{path}" for c, b, path in sorted(found))


def config_facts(data: dict[str, Any], params: int | None) -> ModelFacts:
    """ModelFacts from a transformers config (its ``text_config`` for multimodal ones)."""
    data = data.get("text_config", data)
    widths = {key: data[key] for key in WIDTH_KEYS if isinstance(data.get(key), int)}
    heads = data.get("num_attention_heads")
    head_dim = data.get("head_dim") or (data["hidden_size"] // heads if heads and data.get("hidden_size") else None)
    kv_heads = data.get("num_key_value_heads") or heads
    return ModelFacts(widths=widths, params=params, layers=data.get("num_hidden_layers"),
                      vocab=data.get("vocab_size"),
                      kv_width=kv_heads * head_dim if kv_heads and head_dim else None)


@dataclass(frozen=True)
class Verdict:
    skip: bool
    error_class: str | None = None
    reason: str | None = None
    note: str | None = None  # e.g. a group-size fallback the cell will use
    where: str | None = None  # 'driver <host>' or 'worker <host>': where the deciding check ran


def here() -> str:
    return f"driver {socket.gethostname()}"


def model_facts(path: str, revision: str | None = None) -> ModelFacts | None:
    """Widths and parameter count from the config and weight headers; None when not at hand."""
    if path.startswith("known:"):
        return _known_facts(path.removeprefix("known:"))
    if kind(path) == "hub":
        return _hub_facts(path, revision)
    directory = Path(path).expanduser()
    config = directory / "config.json"
    if not config.is_file():
        return None
    shapes = _safetensors_shapes(directory)
    facts = config_facts(json.loads(config.read_text()), _params(shapes) if shapes else None)
    return replace(facts, linear_names=linear_names(shapes)) if shapes else facts


def _hub_facts(repo: str, revision: str | None) -> ModelFacts | None:
    """Facts of a hub model from its ``config.json`` (downloaded alone, or read from the hub
    cache offline) and its safetensors headers (the hub's metadata API, or the cached files);
    None when the hub cannot be asked (offline and not cached, a refusal: the worker will say)."""
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        config = Path(hf_hub_download(repo, "config.json", revision=revision))
    except Exception:  # noqa: BLE001 - not at hand here: the checks are deferred to the worker
        return None
    facts = model_facts(str(config.parent))  # the snapshot folder: cached weights give params
    if facts is None:
        return None
    if facts.params is None and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            metadata = get_safetensors_metadata(repo, revision=revision)
            shapes = {name: info.shape for file in metadata.files_metadata.values()
                      for name, info in file.tensors.items()}
            facts = replace(facts, params=_params(shapes) or None, linear_names=linear_names(shapes))
        except Exception:  # noqa: BLE001 - no safetensors headers: the memory check is skipped
            pass
    return facts


def _safetensors_shapes(directory: Path) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors headers of ``directory`` (no weight is read)."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes.update({name: info["shape"] for name, info in header.items() if name != "__metadata__"})
    return shapes


def _params(shapes: dict[str, list[int]]) -> int:
    total = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


def _known_facts(name: str) -> ModelFacts | None:
    from tasks.models import cache_dir  # torch-free at import; loading is lazy

    converted = cache_dir() / "models" / name
    if (converted / "config.json").is_file():
        return model_facts(str(converted))
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.package)
    if spec is None or spec.origin is None:
        return None
    import gguf

    reader = gguf.GGUFReader(Path(spec.origin).parent / known.gguf_file)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def field(key: str) -> int:
        f = reader.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    hidden, heads = field("embedding_length"), field("attention.head_count")
    names = []  # blk.<i>.<llama.cpp name>.weight, as transformers names the module
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LINEAR and parts[3] == "weight":
            names.append((int(parts[1]), f"model.layers.{parts[1]}.{GGUF_LINEAR[parts[2]]}"))
    return ModelFacts(widths={"hidden_size": hidden, "intermediate_size": field("feed_forward_length")},
                      params=sum(int(t.n_elements) for t in reader.tensors), layers=field("block_count"),
                      vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
                      kv_width=field("attention.head_count_kv") * (hidden // heads),
                      linear_names=tuple(name for _, name in sorted(names)))


def spec_problems(spec: Spec, facts: dict[str, ModelFacts | None]) -> list[str]:
    """Problems that make the spec itself wrong for its models (reported like spec errors)."""
    problems = []
    uses_groups = any(get_method(m.name).uses_group_size for m in spec.methods)
    for model in spec.models:
        model_facts_ = facts.get(model.path)
        if not uses_groups or not model_facts_ or not model_facts_.widths:
            continue
        widths = model_facts_.widths
        refusing = [m for m in spec.methods if m.params.get("group_fallback") == "error"]
        for i, group_size in enumerate(spec.group_sizes):
            bad = non_divisible(widths, group_size)
            for method in refusing if bad else ():
                shown = ", ".join(f"{k}={v}" for k, v in bad.items())
                problems.append(f"{spec.source}: group_sizes[{i}]={group_size}: does not divide {model.name}'s "
                                f"{shown} and {method.name} has group_fallback: error; remove the group size, "
                                "exclude it for that method or choose another group_fallback")
            if group_size != -1 and all(w % group_size for w in widths.values()):
                shown = ", ".join(f"{k}={v}" for k, v in widths.items())
                divisors = [g for g in (16, 32, 64, 96, 128, 192, 256) if all(w % g == 0 for w in widths.values())]
                problems.append(f"{spec.source}: group_sizes[{i}]={group_size}: divides none of "
                                f"{model.name}'s layer widths ({shown}), so every layer would take the "
                                f"fallback; use a divisor such as {', '.join(map(str, divisors)) or '-1'}")
    return problems


def validate_models(spec: Spec) -> dict[str, ModelFacts | None]:
    """Each model's facts; raises SpecError when the spec is wrong for its models."""
    facts = {model.path: model_facts(model.path, model.revision) for model in spec.models}
    problems = spec_problems(spec, facts)
    if problems:
        raise SpecError(problems)
    return facts


def host_memory_bytes() -> int | None:
    """Memory of this host, for embedded runs; None on a cluster (its nodes may differ)."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    import psutil

    return psutil.virtual_memory().total


def local_paths(cell: Cell) -> list[tuple[str, str, str]]:
    """(path, 'dir' | 'file', what it is) of each local path the cell needs where it runs."""
    wanted = []
    if is_local(cell.model.path):
        wanted.append((cell.model.path, "dir", "model directory"))
    if is_local(cell.dataset.path):
        wanted.append((cell.dataset.path, "file", "dataset file"))
    calibration = (cell.calibration or {}).get("dataset") or ""
    if is_local(calibration):
        wanted.append((calibration, "file", "calibration set"))
    return wanted


def location_verdict(cell: Cell, found: dict[str, str | None], where: str) -> Verdict:
    """Skip a cell whose local model directory, dataset or calibration file is not on the
    machine that reported ``found`` (path -> 'dir' | 'file' | None)."""
    for path, wants, what in local_paths(cell):
        state = found.get(path)
        if state is None or (wants == "dir" and state != "dir"):
            return Verdict(True, "data", f"{what} {path} does not exist (checked on {where})", where=where)
    return Verdict(False)


RECORDS_SEQ = 1024  # tokens of a records task's longest request (prompt + few-shot), assumed
SLACK = 1.10  # allocator fragmentation and workspaces beyond the tensors counted


@dataclass(frozen=True)
class MemoryPlan:
    """What one group holds on the device the weights go to, stage by stage: each stage's
    items as (what, bytes, arithmetic). ``peak`` is the largest stage, with ``SLACK``."""

    stages: dict[str, tuple[tuple[str, int, str], ...]]

    def total(self, stage: str) -> int:
        return sum(b for _, b, _ in self.stages[stage])

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.total)

    @property
    def peak(self) -> int:
        return int(self.total(self.peak_stage) * SLACK)

    def explain(self, stage: str | None = None) -> str:
        stage = stage or self.peak_stage
        parts = " + ".join(f"{what} {b / 2**30:.2f} GiB ({how})" for what, b, how in self.stages[stage] if b)
        return f"{stage}: {parts}, x{SLACK:.2f} slack = {self.peak / 2**30:.1f} GiB"


def memory_plan(cell: Cell, facts: ModelFacts, accelerator: bool, device_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of ``cell``'s group where its weights live: on an accelerator (the base
    model moves to the host while the quantized copy is made and evaluated: the worker's
    ``working_copy``/``offload_base``; spread over the GPUs of a ``gpus_per_actor`` > 1 actor it
    stays beside its copy) or on the host (the base stays beside its copy).

    Activation statistics (methods that declare them) are (in^2 + in) x 4 B per linear layer;
    on an accelerator of ``device_bytes`` they accumulate a pass at a time within a quarter of
    it (``tasks.calibration.stats_budget``), on the host they are whole. The evaluation peak is the logits of one batch
    in float32 (model's, log-softmax and the reference's for KL: 3 x batch x seq x vocab x 4 B)
    plus the K/V of the batch (2 x blocks x batch x seq x kv width x dtype)."""
    info = get_method(cell.method)
    size = DTYPE_BYTES[cell.model.dtype]
    weights = facts.params * size
    base = ("base weights", weights, f"{facts.params:,} params x {size} B {cell.model.dtype}")
    copy = ("quantized copy", weights, f"{facts.params:,} params x {size} B (dense while quantizing)")
    settings = cell.dataset.settings
    batch = int(settings.get("batch_size") or 8)
    seq = int(settings.get("seq_len") or RECORDS_SEQ)
    assumed = "" if settings.get("seq_len") else f" (seq {RECORDS_SEQ}: assumed for a records task)"
    evaluation = []
    if facts.vocab:
        logits = 3 * batch * seq * facts.vocab * 4
        evaluation.append(("logits", logits, f"3 x {batch} x {seq} x {facts.vocab:,} vocab x 4 B{assumed}"))
    if facts.layers and facts.kv_width:
        kv = 2 * facts.layers * batch * seq * facts.kv_width * size
        evaluation.append(("K/V", kv, f"2 x {facts.layers} blocks x {batch} x {seq} x {facts.kv_width} x {size} B"))
    stages: dict[str, tuple] = {"load": (base,)}
    if info.needs_activation_stats and facts.layers:
        hidden, inter = facts.widths.get("hidden_size", 0), facts.widths.get("intermediate_size", 0)
        # per block: q, k, v, o and the gate/up (or fc1) projections read the hidden width,
        # the down (fc2) projection the intermediate width
        total = facts.layers * (6 * (hidden * hidden + hidden) + (inter * inter + inter)) * 4
        how = f"{facts.layers} blocks x (6 x {hidden}^2 + {inter}^2) x 4 B"
        if accelerator and device_bytes:
            how += f" = {total / 2**30:.2f} GiB, a pass at a time within a quarter of the device"
            total = min(total, device_bytes // 4)
        stages["calibrate"] = (base, ("activation statistics", total, how))
    # the base leaves a single GPU for its copy; spread over several (gpus_per_actor) it stays
    alone = accelerator and cell.model.gpus_per_actor == 1
    if cell.method != "baseline":
        stages["quantize"] = (copy,) if alone else (base, copy)
        stages["evaluate"] = ((copy,) if alone else (base, copy)) + tuple(evaluation)
    else:
        stages["evaluate"] = (base,) + tuple(evaluation)
    return MemoryPlan(stages)


def memory_verdict(cell: Cell, facts: ModelFacts | None, memory_bytes: int | None, where: str,
                   holder: str | None = None) -> Verdict:
    """Skip a cell whose group's memory plan exceeds ``memory_bytes`` of ``holder`` (an
    accelerator, where the weights go; default: ``where``, the host checked); the reason gives
    the plan's arithmetic."""
    if facts is None or not facts.params or not memory_bytes:
        return Verdict(False)
    accelerator = holder is not None
    if accelerator and cell.model.gpus_per_actor > 1:  # the actor holds that many of these GPUs
        memory_bytes *= cell.model.gpus_per_actor
        holder = f"{cell.model.gpus_per_actor} x {holder}"
    plan = memory_plan(cell, facts, accelerator, memory_bytes)
    if plan.peak > memory_bytes:
        return Verdict(True, "oom", f"needs about {plan.peak / 2**30:.1f} GiB at {plan.explain()}; "
                       f"{holder or where} has {memory_bytes / 2**30:.1f} GiB", where=where)
    return Verdict(False)


def check(cell: Cell, facts: ModelFacts | None, memory_bytes: int | None,
          machine: bool = True) -> Verdict:
    """The cell's verdict: its model package, then (``machine``: on this host) its local paths
    and memory, then its method's capabilities for the model's shapes."""
    where = here()
    model_path = cell.model.path
    if model_path.startswith("known:"):
        known = KNOWN_MODELS[model_path.removeprefix("known:")]
        if importlib.util.find_spec(known.package) is None:
            return Verdict(True, "data", f"model '{known.name}' needs the package '{known.package}': "
                           f"{known.install}", where=where)
    if machine:
        verdict = location_verdict(cell, path_kinds([path for path, _, _ in local_paths(cell)]), where)
        if verdict.skip:
            return verdict
    if facts is None:
        verdict = capability_verdict(cell, {})
        return verdict if verdict.skip else Verdict(False, note=f"model config of {model_path} not readable "
                                                            "here: shape and memory checks deferred to the worker")
    if machine:
        verdict = memory_verdict(cell, facts, memory_bytes, f"{where} (this host)")
        if verdict.skip:
            return verdict
    return capability_verdict(cell, facts.widths)


def machine_verdict(cell: Cell, probe: dict[str, Any], driver_facts: ModelFacts | None) -> Verdict:
    """The verdict on facts a probe gathered on a worker (``probe``: ``machine_facts`` plus
    ``models``, each model path's ModelFacts there): local paths, memory, and the shape checks
    the driver had to defer because it could not read the model's config."""
    where = f"worker {probe['host']}"
    verdict = location_verdict(cell, probe["paths"], where)
    if verdict.skip:
        return verdict
    verdict = device_verdict(cell, probe, where)
    if verdict.skip:
        return verdict
    facts = driver_facts or probe["models"].get(cell.model.path)
    if probe.get("gpu_memory_bytes"):  # the actors run on this kind of GPU: weights go there
        verdict = memory_verdict(cell, facts, probe["gpu_memory_bytes"], where,
                                 f"{where}'s GPU ({probe.get('gpu_name')})")
    else:
        verdict = memory_verdict(cell, facts, probe["memory_bytes"], where)
    if verdict.skip or facts is None or driver_facts is not None:
        return verdict
    verdict = capability_verdict(cell, facts.widths)
    return replace(verdict, where=where) if verdict.skip else verdict


def device_verdict(cell: Cell, probe: dict[str, Any], where: str) -> Verdict:
    """Skip a cell whose method (or engine) has a kernel on CUDA only when the worker that
    would run it has no GPU (``machine_facts``' ``gpu_memory_bytes``)."""
    info = get_method(cell.method)
    caps = info.caps(cell.params)
    if caps.requires_cuda and not probe.get("gpu_memory_bytes"):
        engine = f" (engine {cell.params['engine']})" if "engine" in cell.params else ""
        return Verdict(True, "unsupported", f"'{info.name}'{engine} needs a CUDA GPU and {where} has none: "
                       f"{caps.note}", where=where)
    return Verdict(False)


def capability_verdict(cell: Cell, widths: dict[str, int]) -> Verdict:
    """Skip a cell outside its method's (or engine's) capabilities, with the reason; note the
    group fallback a cell that runs will use."""
    info = get_method(cell.method)
    caps = info.caps(cell.params)
    bad = non_divisible(widths, cell.group_size) if info.uses_group_size else {}
    fallback = cell.params.get("group_fallback", "ragged")
    why = caps.unsupported(cell.bits if info.uses_bits else None,
                           cell.group_size if info.uses_group_size else None, fallback, bad,
                           bool(cell.params.get("overrides")), pruned=bool(cell.params.get("prune")))
    if why:
        engine = f" (engine {cell.params['engine']})" if "engine" in cell.params else ""
        note = f": {caps.note}" if caps.note else ""
        return Verdict(True, "unsupported", f"'{info.name}'{engine} {why}{note}", where=here())
    if not bad:
        return Verdict(False)
    described = ", ".join(f"{key}={width}" for key, width in bad.items())
    return Verdict(False, note=f"group size {cell.group_size} does not divide {described}: "
                               f"group_fallback {fallback}")
