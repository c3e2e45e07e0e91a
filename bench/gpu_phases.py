"""The phases of ``bench/gpu_run.py``, each run in its own process (``--phase NAME``) so that a
kernel that hangs, crashes or compiles too long costs its phase only. Each phase writes one
JSON object to ``<work>/phase-<name>.json``: ``status`` (ok | failed | skipped), ``reason`` for
anything not measured, ``seconds``, and its figures. Everything measured goes through the
project's own code: ``tasks.worker`` (load, calibrate, quantize, evaluate, the groups' rows),
``tasks.profile.speed.profile_speed`` and ``tasks.profile.trackers.MemoryTracker``, the method
registry, ``orchestrator.preflight`` (verdicts, memory plan).

The models are random-init (no hub access there, and SmolLM2's GGUF is over the carry limit):
``smollm2-shaped`` has SmolLM2-135M's widths and depth and is trained for a few hundred steps on
the pydoc-topics train split so that its logits are not uniform (perplexities then move with
quantization, and a CPU-vs-GPU comparison means something); ``llama-3.2-1b-shaped`` and
``llama-3.1-8b-shaped`` have those models' shapes and untrained random weights: speed only.
In the CPU smoke run every model is a tiny one of the same architecture.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the byte-level tokenizer of the tiny models

log = logging.getLogger("gpu_run")

def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
           context: int, rope_theta: float) -> dict[str, Any]:
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": context,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta}}


# name -> LlamaConfig keywords (the published configs' shapes; contexts cut to what is profiled)
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-shaped": _llama(576, 1536, 30, 9, 3, 49152, True, 2048, 100000.0),
    "llama-3.2-1b-shaped": _llama(2048, 8192, 16, 32, 8, 128256, True, 4096, 500000.0),
    "llama-3.1-8b-shaped": _llama(4096, 14336, 32, 32, 8, 128256, False, 4096, 500000.0),
}
# every shape in the CPU smoke run: the same architecture, tiny (its head tied as the shape's)
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 259, "max_position_embeddings": 512}

# HBM bandwidth by the vendors' datasheets, bytes/s, matched against torch's device name
DATASHEET_BANDWIDTH = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                       ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
                       ("L40S", 0.864e12))
# relative perplexity difference GPU vs CPU allowed: same weights (data-free methods) / weights
# quantized on each device (calibrated methods: GPTQ's and AWQ's float order differs)
TOLERANCE = {"data-free": 0.02, "calibrated": 0.05}


def settings(cuda: bool) -> dict[str, Any]:
    """Sizes of every phase: the H200's, or the CPU smoke run's (same code, tiny sizes)."""
    if cuda:
        return {"train_steps": 300, "train_batch": 16, "train_seq": 256,
                "eval": {"limit": 8, "seq_len": 256, "batch_size": 4},
                "calibration": {"dataset": "pydoc-topics", "samples": 8, "seq_len": 256},
                "sweep_profile": {"prompt_len": 32, "gen_len": 16, "batch_sizes": [1, 8], "repeats": 2, "warmup": 1},
                "decode_shapes": ["llama-3.2-1b-shaped", "llama-3.1-8b-shaped"],
                "decode_profile": {"prompt_len": 128, "gen_len": 64, "batch_sizes": [1, 8, 32], "repeats": 3,
                                   "warmup": 1},
                "memory_shape": "llama-3.2-1b-shaped", "memory_eval": {"limit": 4, "seq_len": 512, "batch_size": 4}}
    return {"train_steps": 30, "train_batch": 4, "train_seq": 64,
            "eval": {"limit": 4, "seq_len": 64, "batch_size": 2},
            "calibration": {"dataset": "pydoc-topics", "samples": 4, "seq_len": 64},
            "sweep_profile": {"prompt_len": 8, "gen_len": 3, "batch_sizes": [1, 2], "repeats": 1, "warmup": 0},
            "decode_shapes": ["llama-3.2-1b-shaped", "llama-3.1-8b-shaped"],
            "decode_profile": {"prompt_len": 8, "gen_len": 4, "batch_sizes": [1, 8, 32], "repeats": 1, "warmup": 0},
            "memory_shape": "llama-3.2-1b-shaped", "memory_eval": {"limit": 2, "seq_len": 64, "batch_size": 2}}


# ---------------------------------------------------------------- models


def model_config(shape: str, cuda: bool):
    from tiny import byte_tokenizer
    from transformers import LlamaConfig

    keywords = dict(SHAPES[shape]) if cuda else {**TINY, "tie_word_embeddings": SHAPES[shape]["tie_word_embeddings"]}
    return LlamaConfig(**keywords, bos_token_id=1, eos_token_id=2, pad_token_id=2), byte_tokenizer()[0]


def build_model(work: Path, shape: str, cuda: bool, train_steps: int = 0, **train: int) -> tuple[Path, dict]:
    """The model folder of ``shape`` under ``work`` (random init, bfloat16, saved with
    ``save_pretrained``; trained ``train_steps`` steps first when asked), built once."""
    import torch
    from transformers import LlamaForCausalLM

    folder = work / "models" / shape
    facts_file = folder / "built.json"
    if facts_file.is_file():
        return folder, json.loads(facts_file.read_text())
    config, tokenizer = model_config(shape, cuda)
    device = "cuda" if cuda else "cpu"
    started = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if train_steps else torch.bfloat16)  # an 8B model: 16 GB, not 32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    facts: dict[str, Any] = {"shape": shape, "config": {k: config.to_dict().get(k) for k in SHAPES[shape]},
                             "params": sum(p.numel() for p in model.parameters()),
                             "weights": "random init (std 0.02)"}
    if train_steps:
        facts |= train_model(model, tokenizer, device, train_steps, **train)
    model = model.to(torch.bfloat16)
    facts["init_s"] = time.perf_counter() - started
    started = time.perf_counter()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    facts["save_s"] = time.perf_counter() - started
    facts["bytes_on_disk"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    facts_file.write_text(json.dumps(facts))
    del model
    if cuda:
        torch.cuda.empty_cache()
    return folder, facts


def train_model(model: Any, tokenizer: Any, device: str, steps: int, train_batch: int, train_seq: int) -> dict:
    """A few hundred AdamW steps on the pydoc-topics train split (bfloat16 autocast on CUDA), so
    that the random model predicts text better than uniform; returns the loss curve's ends."""
    import torch

    from tasks.evaluate.data import prompt_texts
    from tasks.evaluate.perplexity import token_stream

    ids = torch.tensor(token_stream(tokenizer, prompt_texts("builtin:pydoc-topics", "train"), None), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 if device == "cpu" else 1e-3, weight_decay=0.0)
    generator = torch.Generator(device="cpu").manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - train_seq - 1, (train_batch,), generator=generator).tolist()
        batch = torch.stack([ids[s:s + train_seq] for s in starts])
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                            enabled=device.startswith("cuda")):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return {"weights": f"random init, then {steps} AdamW steps on pydoc-topics train "
                       f"({train_batch} x {train_seq} tokens a step)",
            "train_loss_first": losses[0], "train_loss_last": sum(losses[-10:]) / len(losses[-10:])}


# ---------------------------------------------------------------- env


def phase_env(cuda: bool, work: Path) -> dict:
    """Versions, the GPU, its datasheet bandwidth and a measured device-to-device copy."""
    from importlib import metadata

    import torch

    found: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                             "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    for name in ("transformers", "gptqmodel", "torchao", "bitsandbytes", "pydantic", "datasets", "nvidia-ml-py"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    out: dict[str, Any] = {"versions": found, "skipped": {}}
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible (torch.cuda.is_available() is False); "
                           "for a CPU smoke run: --device cpu")
    if not cuda:
        out["gpu"] = None
        out["skipped"]["gpu"] = "CPU smoke run: no GPU name, driver, bandwidth or copy measurement"
        return out
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    gpu = {"name": name, "capability": list(torch.cuda.get_device_capability(0)), "sm_count": props.multi_processor_count,
           "memory_bytes": props.total_memory, "driver": driver_version()}
    figure = next(((key, value) for key, value in DATASHEET_BANDWIDTH if key in name), None)
    gpu["bandwidth_datasheet_Bps"] = figure[1] if figure else None
    gpu["bandwidth_source"] = (f"datasheet figure for '{figure[0]}' matched in the device name '{name}'"
                               if figure else f"no datasheet figure known for '{name}'")
    gpu["copy_bandwidth_Bps"] = copy_bandwidth()
    out["gpu"] = gpu
    return out


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception as exc:  # noqa: BLE001 - informational
        return f"unknown ({type(exc).__name__}: {exc})"


def copy_bandwidth(size: int = 2 * 2**30, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of ``size`` bytes (mean of
    ``repeats`` after 3 warm-ups), the achievable ceiling beside the datasheet's."""
    import torch

    source = torch.empty(size, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 2 * size * repeats / (start.elapsed_time(end) / 1e3)


# ---------------------------------------------------------------- prebuild


def phase_prebuild(cuda: bool, work: Path) -> dict:
    """Build GPTQModel's JIT CUDA kernels (Marlin bf16, ExLlama v2) ahead of the phases that
    load GPTQ checkpoints, in the background: the first AUTO load would otherwise compile them."""
    if not cuda:
        return {"status": "skipped", "reason": "CPU smoke run: GPTQModel's CUDA kernels (Marlin, ExLlama v2) "
                                               "are JIT-compiled with nvcc on a GPU machine only"}
    from gptqmodel import extension

    built = {}
    for name in ("marlin_bf16", "exllamav2"):
        started = time.perf_counter()
        try:
            ok = bool(extension.load(name).get(name))
            built[name] = {"ok": ok, "seconds": time.perf_counter() - started,
                           "error": None if ok else extension.error(name)}
        except Exception as exc:  # noqa: BLE001 - reported
            built[name] = {"ok": False, "seconds": time.perf_counter() - started,
                           "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"extensions": built}


# ---------------------------------------------------------------- sweep


def sweep_spec(model_path: Path, cuda: bool) -> Any:
    """The demo-style sweep: every engine with a packed kernel, 4-bit group 64 (8-bit per row)."""
    from orchestrator.spec import parse_spec

    size = settings(cuda)
    return parse_spec({
        "name": "gpu-run-sweep", "models": [{"name": "smollm2-shaped", "path": str(model_path), "dtype": "bfloat16"}],
        # GPTQModel's cells last: on a fresh GPU machine their kernels may still be compiling
        "methods": [{"name": "baseline"}, {"name": "rtn", "sym": True},
                    {"name": "int4", "engine": "torchao"},
                    {"name": "nf4"},
                    {"name": "int8", "engine": "torchao", "bits": [8], "group_sizes": [-1]},
                    {"name": "fp8", "engine": "torchao", "bits": [8], "group_sizes": [-1]},
                    {"name": "gptq", "engine": "gptqmodel", "sym": False},
                    {"name": "awq", "engine": "gptqmodel", "sym": False}],
        "bits": [4], "group_sizes": [64],
        "datasets": [{"name": "pydoc-topics", "task": "perplexity", **size["eval"]}],
        "calibration": size["calibration"], "profile": size["sweep_profile"],
    }, source="bench/gpu_run.py")


ROW_FIELDS = ("status", "error_class", "error_stage", "error_message", "primary_metric", "primary_value",
              "kl_divergence", "weight_format", "kernel", "engine", "weight_bytes", "bits_per_weight",
              "compute_dtype", "ttft_ms", "tpot_p50_ms", "tpot_p95_ms", "throughput_tok_s", "profile_device",
              "peak_rss_bytes", "cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes", "nvml_peak_process_bytes",
              "resident_base_bytes", "time_quantize_s", "time_evaluate_s", "quant_details")


def phase_sweep(cuda: bool, work: Path, device: str, name: str) -> dict:
    """The sweep's cells on ``device`` (cuda, or the CPU reference of the same cells), judged
    first by the worker-side preflight (a CUDA-only method on a CPU worker becomes a skipped row,
    with its reason), then run group by group through ``tasks.worker.run_group_rows``."""
    import torch

    from orchestrator.cells import expand, group_cells
    from orchestrator.preflight import local_paths, machine_verdict, model_facts
    from tasks.locations import machine_facts
    from tasks.worker import WorkerState, run_group_rows

    size = settings(cuda)
    model_path, built = build_model(work, "smollm2-shaped", cuda, size["train_steps"],
                                    train_batch=size["train_batch"], train_seq=size["train_seq"])
    cells = expand(sweep_spec(model_path, cuda))
    paths = sorted({path for cell in cells for path, _, _ in local_paths(cell)})
    probe = machine_facts(paths) | {"models": {str(model_path): model_facts(str(model_path))}}
    rows: dict[str, dict] = {}
    runnable = []
    for cell in cells:
        verdict = machine_verdict(cell, probe, model_facts(str(model_path)))
        if verdict.skip:
            rows[cell.cell_id] = {"status": "skipped", "error_class": verdict.error_class,
                                  "error_message": verdict.reason, "checked_on": verdict.where}
        else:
            runnable.append(cell)
    state = WorkerState(device=device, artifacts=None)

    def result() -> dict:
        described = [{"cell_id": cell.cell_id, "method": cell.method, "params": cell.params, "bits": cell.bits,
                      "group_size": cell.group_size,
                      **rows.get(cell.cell_id, {"status": "not run", "error_message": "the phase ended first"})}
                     for cell in cells]
        return {"device": device, "model": built, "model_path": str(model_path),
                "probe_gpu": probe.get("gpu_name"), "rows": described}

    for group in group_cells(runnable):
        started = time.perf_counter()
        for cell_id, row in run_group_rows(group, state).items():
            rows[cell_id] = {key: row.get(key) for key in ROW_FIELDS} | {"group_seconds": time.perf_counter() - started}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        write_phase(work, name, result() | {"status": "partial"})
    return result()


# ---------------------------------------------------------------- decode


def weight_read_bytes(model: Any) -> int:
    """Bytes a decode step reads of the weights: every parameter as held in memory (a packed
    tensor's codes, scales and padding), except the input embedding table, of which a step reads
    one row per sequence (tied to the output head, it is read whole there: counted once)."""
    from tasks.models import tensor_bytes, tensor_key

    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    seen, total = set(), 0
    for parameter in model.parameters():
        if tensor_key(parameter) in seen or (parameter is embedding and not tied):
            continue
        seen.add(tensor_key(parameter))
        total += tensor_bytes(parameter)
    return total


def speed_figures(profile: Any, weight_bytes: int, bandwidth: float | None, copy: float | None) -> list[dict]:
    """One record per batch size: TTFT, step p50/p95, tokens/s, every memory kind, and the
    fraction of the bandwidth limit the decode step reached."""
    config = profile.config
    figures = []
    for batch in profile.batches:
        step_s = batch.latency.tpot_p50_ms.median / 1e3
        # the KV cache read by a step, at the run's mean context (prompt + half the new tokens)
        kv_read = batch.kv_cache_bytes * (config.prompt_len + config.gen_len / 2) / (config.prompt_len + config.gen_len)
        memory = batch.memory
        record = {"batch_size": batch.batch_size,
                  "ttft_ms": batch.latency.ttft_ms.median, "tpot_p50_ms": batch.latency.tpot_p50_ms.median,
                  "tpot_p95_ms": batch.latency.tpot_p95_ms.median, "tokens_per_s": batch.tokens_per_s.median,
                  "tokens_per_s_min": batch.tokens_per_s.min, "tokens_per_s_max": batch.tokens_per_s.max,
                  "runs": batch.tokens_per_s.n, "weight_bytes_read_per_step": weight_bytes,
                  "kv_bytes_read_per_step": int(kv_read), "kv_cache_bytes_end": batch.kv_cache_bytes,
                  "rss_bytes": memory.rss_bytes, "rss_method": memory.rss_method,
                  "cuda_allocated_bytes": memory.cuda_allocated_bytes, "cuda_reserved_bytes": memory.cuda_reserved_bytes,
                  "nvml_process_bytes": memory.nvml_process_bytes, "nvml_note": memory.nvml_note}
        for key, limit in (("datasheet", bandwidth), ("copy", copy)):
            record[f"bandwidth_fraction_{key}"] = (weight_bytes + kv_read) / step_s / limit if limit else None
        figures.append(record)
    return figures


def graph_step_ms(model: Any, batch_size: int, context: int, replays: int = 20) -> dict:
    """One decode step captured in a CUDA graph (a StaticCache at ``context`` tokens) and
    replayed: the step's GPU time without the host's kernel launches, against which the eager
    step's launch overhead is read."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + 8)
    ids = torch.full((batch_size, context), 5, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(context, device="cuda"), use_cache=True)
        token = torch.full((batch_size, 1), 7, dtype=torch.long, device="cuda")
        position = torch.tensor([context], device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return {"batch_size": batch_size, "context": context, "step_ms": start.elapsed_time(end) / replays,
            "replays": replays}


def profile_model(model: Any, tokenizer: Any, dataset: Any, cuda: bool, bandwidth: float | None,
                  copy: float | None) -> dict:
    from tasks.profile.config import ProfileConfig
    from tasks.profile.speed import profile_speed

    config = ProfileConfig(**settings(cuda)["decode_profile"])
    device = "cuda" if cuda else "cpu"
    profile = profile_speed(model, tokenizer, dataset, config, device)
    out: dict[str, Any] = {"profile_device": profile.device, "backend": profile.backend,
                           "settings": config.model_dump(), "weight_bytes_read_per_step": weight_read_bytes(model),
                           "batches": None, "graph": [], "skipped": {}}
    out["batches"] = speed_figures(profile, out["weight_bytes_read_per_step"], bandwidth, copy)
    if not cuda:
        out["skipped"]["bandwidth_fraction"] = "CPU smoke run: no HBM bandwidth figure for a CPU"
        out["skipped"]["graph"] = "CPU smoke run: CUDA graph replay needs CUDA"
        out["skipped"]["cuda_memory"] = ("CPU smoke run: torch allocated / reserved and NVML process memory are "
                                         "GPU figures (None on CPU); RSS measured")
        return out
    context = config.prompt_len + config.gen_len // 2
    for batch_size in config.measured_batch_sizes():
        if GRAPH_FAILURE:  # a failed capture can leave the stream unusable: not tried again
            out["skipped"]["graph"] = f"not tried: a capture failed earlier in this phase ({GRAPH_FAILURE[0][:300]})"
            break
        try:
            out["graph"].append(graph_step_ms(model, batch_size, context))
        except Exception as exc:  # noqa: BLE001 - the eager figures stand without it
            GRAPH_FAILURE.append(f"{type(exc).__name__}: {exc}")
            out["skipped"]["graph"] = f"CUDA graph capture failed: {type(exc).__name__}: {exc}"[:1000]
            break
    return out


GRAPH_FAILURE: list[str] = []  # the first capture failure of this process, if any


def decode_dataset(model_path: Path, cuda: bool) -> Any:
    from orchestrator.cells import expand
    from orchestrator.spec import parse_spec

    spec = parse_spec({"name": "gpu-run-decode", "models": [{"name": "m", "path": str(model_path), "dtype": "bfloat16"}],
                       "methods": [{"name": "baseline"}],
                       "datasets": [{"name": "pydoc-topics", "task": "perplexity", "limit": 1}]},
                      source="bench/gpu_run.py")
    return expand(spec)[0].dataset


def phase_decode(cuda: bool, work: Path) -> dict:
    """Decode speed of the 1B- and 8B-shaped random models, bf16 then packed int4 (the registry's
    ``int4`` method, torchao tinygemm, group 64), at batch 1, 8 and 32."""
    import torch

    from tasks.errors import UnsupportedError
    from tasks.models import load_model
    from tasks.quantize.base import QuantContext
    from tasks.quantize.registry import Int4Config, get_method

    env = read_phase(work, "env") or {}
    gpu = env.get("gpu") or {}
    bandwidth, copy = gpu.get("bandwidth_datasheet_Bps"), gpu.get("copy_bandwidth_Bps")
    out: dict[str, Any] = {"weights": "random (speed only, no quality)", "shapes": {}}
    for shape in settings(cuda)["decode_shapes"]:
        record: dict[str, Any] = {}
        out["shapes"][shape] = record
        write_phase(work, "decode", out | {"status": "partial"})  # what is done survives a timeout
        folder, record["model"] = build_model(work, shape, cuda)
        started = time.perf_counter()
        model, tokenizer = load_model(str(folder), "bfloat16", "cuda" if cuda else "cpu")
        record["load_s"] = time.perf_counter() - started
        dataset = decode_dataset(folder, cuda)
        record["bf16"] = profile_model(model, tokenizer, dataset, cuda, bandwidth, copy)
        write_phase(work, "decode", out | {"status": "partial"})
        method = get_method("int4")
        ctx = QuantContext(model_path=str(folder), workdir=Path(tempfile.mkdtemp(dir=work)),
                           device="cuda" if cuda else "cpu")
        try:
            started = time.perf_counter()
            report = method.load()().quantize(model, None, Int4Config(), 4, 64, ctx)
            record["int4"] = {"quantize_s": time.perf_counter() - started, "kernel": report.kernel,
                              "engine": report.engine, "layers_quantized": len(report.quantized_layers),
                              "bits_per_weight": report.bits_per_weight(), **report.extra,
                              **profile_model(model, tokenizer, dataset, cuda, bandwidth, copy)}
        except UnsupportedError as exc:
            record["int4"] = {"skipped": {"int4": f"packed int4 not measured: {exc}"}}
        del model
        if cuda:
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- memory


def phase_memory(cuda: bool, work: Path) -> dict:
    """One GPTQ group (GPTQModel, 4-bit g128) of the 1B-shaped model, stage by stage as
    ``tasks.worker.run_group`` runs it, each stage inside a ``MemoryTracker``; against
    ``orchestrator.preflight.memory_plan`` of the same cell. Then the packed model's decode."""
    import shutil

    import torch

    from orchestrator.cells import Group, expand
    from orchestrator.preflight import SLACK, memory_plan, model_facts
    from orchestrator.spec import parse_spec
    from tasks.evaluate.registry import get_task
    from tasks.profile.trackers import MemoryTracker, Timer
    from tasks.worker import WorkerState, precompute_references, quantize, scratch_dir

    size = settings(cuda)
    device = "cuda" if cuda else "cpu"
    folder, built = build_model(work, size["memory_shape"], cuda)
    spec = parse_spec({"name": "gpu-run-memory", "models": [{"name": "m", "path": str(folder), "dtype": "bfloat16"}],
                       "methods": [{"name": "gptq", "engine": "gptqmodel", "sym": True}], "bits": [4],
                       "group_sizes": [128], "calibration": size["calibration"],
                       "datasets": [{"name": "pydoc-topics", "task": "perplexity", **size["memory_eval"]}]},
                      source="bench/gpu_run.py")
    cell = expand(spec)[0]
    device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else None
    plan = memory_plan(cell, model_facts(str(folder)), accelerator=cuda, device_bytes=device_bytes)
    state = WorkerState(device=device, artifacts=None)
    stages: dict[str, Any] = {}

    def record(stage: str, peak: Any, seconds: float) -> None:
        stages[stage] = {"seconds": seconds, "peak": vars(peak).copy(), "after": current_memory(cuda)}

    with MemoryTracker(device) as peak, Timer(device) as took:
        base, tokenizer = state.base_model(str(folder), "bfloat16")
    record("load", peak, took.seconds)
    data = state.prepared_data(cell, tokenizer)
    # KL's reference log-probs while the base model is on the accelerator, as run_group does
    precompute_references(Group(group_id=cell.group_id, cells=(cell,)), {cell.cell_id: data}, base, state)
    with MemoryTracker(device) as peak, Timer(device) as took:
        calib = state.calibration(cell.calibration, stats=False)
    record("calibrate", peak, took.seconds)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-run-memory-", dir=scratch_dir()))
    with MemoryTracker(device) as peak:
        model, report, seconds = quantize(cell, state, base, calib, workdir)
    record("quantize", peak, seconds)
    resident = state.offload_base()
    base_device = str(next(base.parameters()).device)
    task = get_task(cell.dataset.task).load()()
    with MemoryTracker(device) as peak, Timer(device) as took:
        result = task.evaluate(model, tokenizer, data, reference=state.reference(cell))
    record("evaluate", peak, took.seconds)
    out: dict[str, Any] = {
        "model": built, "cell": {"method": cell.method, "params": cell.params, "bits": cell.bits,
                                 "group_size": cell.group_size, "dataset": cell.dataset.settings},
        "kernel": report.kernel, "engine": report.engine, "perplexity": result.primary.value,
        "weights": "random (memory only: the perplexity of an untrained model means nothing)",
        "resident_base_bytes": resident, "base_device_during_evaluate": base_device,
        "plan": {stage: {"bytes": plan.total(stage), "items": [list(item) for item in items]}
                 for stage, items in plan.stages.items()},
        "plan_peak_bytes": plan.peak, "plan_slack": SLACK, "plan_explain": plan.explain(),
        "stages": stages, "skipped": {}}
    if not cuda:
        out["skipped"]["cuda_memory"] = ("CPU smoke run: torch allocated / reserved and NVML process memory are "
                                         "GPU figures (None on CPU); RSS measured, and the plan is the host's")
    write_phase(work, "memory", out | {"status": "partial"})
    try:  # the packed model's decode with the kernel that evaluated it
        env = read_phase(work, "env") or {}
        gpu = env.get("gpu") or {}
        out["decode"] = profile_model(model, tokenizer, decode_dataset(folder, cuda), cuda,
                                      gpu.get("bandwidth_datasheet_Bps"), gpu.get("copy_bandwidth_Bps"))
    except Exception as exc:  # noqa: BLE001 - reported
        out["skipped"]["decode"] = f"packed GPTQ decode not measured: {type(exc).__name__}: {exc}"[:1000]
    shutil.rmtree(workdir, ignore_errors=True)
    out["allocator_conf"] = os.environ.get("PYTORCH_ALLOC_CONF")  # GPTQModel sets expandable segments
    return out


def current_memory(cuda: bool) -> dict[str, int | None]:
    """What is held right after a stage: live and reserved CUDA bytes and the process's RSS."""
    import psutil
    import torch

    return {"cuda_allocated_bytes": torch.cuda.memory_allocated() if cuda else None,
            "cuda_reserved_bytes": torch.cuda.memory_reserved() if cuda else None,
            "rss_bytes": psutil.Process().memory_info().rss}


# ---------------------------------------------------------------- plumbing


def phase_path(work: Path, name: str) -> Path:
    return work / f"phase-{name}.json"


def write_phase(work: Path, name: str, data: dict) -> None:
    tmp = phase_path(work, name).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str, indent=1))
    os.replace(tmp, phase_path(work, name))


def read_phase(work: Path, name: str) -> dict | None:
    path = phase_path(work, name)
    return json.loads(path.read_text()) if path.is_file() else None


PHASES = {
    "env": phase_env,
    "prebuild": phase_prebuild,
    "decode": phase_decode,
    "sweep": lambda cuda, work: phase_sweep(cuda, work, "cuda" if cuda else "cpu", "sweep"),
    "reference": lambda cuda, work: phase_sweep(cuda, work, "cpu", "reference"),
    "memory": phase_memory,
}


def run_phase(name: str, cuda: bool, work: Path) -> int:
    """Run one phase in this process and write its JSON; a failure is written, not raised."""
    import traceback

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        data = PHASES[name](cuda, work)
        data.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - a phase's failure is data
        traceback.print_exc()
        previous = read_phase(work, name) or {}
        data = previous | {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:4000],
                           "traceback": traceback.format_exc()[-4000:]}
    data["seconds"] = time.perf_counter() - started
    write_phase(work, name, data)
    return 0
