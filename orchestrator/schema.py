"""The one definition of a result row: one row per cell, grouped as in DESIGN.md.

Every column carries its definition as field metadata (``doc``), so a figure never travels
without saying what it measured. ``qsweep query "describe cells"`` shows the columns.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute in upgrade_table

# Version of the row format a row was written with (stamped on each row; never part of a cell's
# identity). 2 added the writer's sequence (run_id, write_generation, write_seq) and checked_on;
# 3 added model_revision and model_commit (models from the hub); 4 added actor_gpus; 5 added
# sparsity and sparse_format, and the layers' sparsity, sparsity_pattern and stored_bytes.
SCHEMA_VERSION = 5

STATUSES = ("ok", "failed", "skipped", "timeout")
ERROR_CLASSES = ("oom", "shape", "unsupported", "nan", "data", "auth", "timeout", "crash", "error")
STAGES = ("preflight", "load", "calibrate", "quantize", "evaluate", "profile")

METRIC = pa.struct([
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("stderr", pa.float64()),
    ("n", pa.int64()),
    ("definition", pa.string()),
    ("ci95_low", pa.float64()),
    ("ci95_high", pa.float64()),
])

LAYER = pa.struct([
    ("name", pa.string()),
    ("in_features", pa.int64()),
    ("out_features", pa.int64()),
    ("quantized", pa.bool_()),
    ("bits", pa.int64()),
    ("group_size", pa.int64()),
    ("group_layout", pa.string()),
    ("fallback", pa.string()),
    ("relative_error", pa.float64()),
    ("reason", pa.string()),
    ("scale_alpha", pa.float64()),
    ("override", pa.string()),
    ("sparsity", pa.float64()),
    ("sparsity_pattern", pa.string()),
    ("stored_bytes", pa.int64()),
])

EXAMPLE = pa.struct([
    ("example_id", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
])

_S, _I, _F, _B, _T = pa.string(), pa.int64(), pa.float64(), pa.bool_(), pa.timestamp("us", tz="UTC")

COLUMNS: list[tuple[str, pa.DataType, str]] = [
    # identity
    ("schema_version", _I, "result-schema version of this row"),
    ("sweep", _S, "sweep name from the spec"),
    ("cell_id", _S, "content hash of the cell's identity (see orchestrator.cells)"),
    ("group_id", _S, "hash of the quantization config shared by cells quantized once"),
    ("spec_hash", _S, "hash of the whole spec file's data when this row was written"),
    ("model", _S, "model name from the spec"),
    ("model_path", _S, "model path or hub id as given ('known:<name>' for a catalogued model)"),
    ("model_revision", _S, "the revision (branch, tag or commit) the spec pins for a hub model; null: "
     "the default branch (part of the cell's identity only when pinned)"),
    ("model_commit", _S, "the hub commit of the model files that ran (the snapshot transformers loaded, "
     "also when read from the cache offline); null for a local directory or a catalogued model"),
    ("dtype", _S, "dtype the model was loaded in"),
    ("method", _S, "quantization method registry name"),
    ("method_params", _S, "method parameters as canonical JSON"),
    ("method_version", _S, "version of the method implementation"),
    ("bits", _I, "weight bit width; null for methods that take none (baseline)"),
    ("group_size", _I, "requested group size; -1 = per output channel; null when not used"),
    ("calibration", _S, "calibration spec as JSON; null for calibration-free methods"),
    ("calibration_tokens", _I, "calibration tokens the method saw (samples x seq_len windows actually "
     "available); null for calibration-free methods"),
    ("calibration_hash", _S, "sha256 of the calibration token ids (int64, row-major): the calibration "
     "set's content identity; null for calibration-free methods"),
    ("calibration_overlap", _F, "fraction of this cell's evaluation token 32-grams that also occur in "
     "its calibration tokens (0 = disjoint); above 0.01 the cell's quality is flagged as measured on "
     "calibration text; null for calibration-free methods"),
    ("engine", _S, "library and version that quantized the cell, e.g. 'gptqmodel 7.6.0'; null for "
     "qsweep's own torch methods"),
    ("dataset", _S, "dataset name from the spec"),
    ("task", _S, "evaluation task registry name"),
    ("task_version", _S, "version of the task definition"),
    ("dataset_path", _S, "dataset file, hub id or builtin source"),
    ("limit", _I, "sample limit from the spec (task-specific unit); null = all"),
    ("eval_settings", _S, "task settings as canonical JSON"),
    ("seed", _I, "seed of the cell"),
    # outcome
    ("status", _S, "ok | failed | skipped | timeout"),
    ("error_class", _S, "oom | shape | unsupported | nan | data | timeout | crash | error; null when ok"),
    ("error_stage", _S, "preflight | load | calibrate | quantize | evaluate | profile; null when ok"),
    ("error_message", _S, "what went wrong or why the cell was skipped"),
    ("error_traceback", _S, "truncated traceback of a failure"),
    ("attempts", _I, "attempts made for this cell across runs, this one included (a crash, timeout or out-of-memory retry is an attempt)"),
    # quality
    ("primary_metric", _S, "name of the task's primary metric"),
    ("primary_value", _F, "value of the primary metric"),
    ("primary_stderr", _F, "standard error of the primary metric"),
    ("primary_n", _I, "samples behind the primary metric (task-specific unit)"),
    ("kl_divergence", _F, "mean per-token KL(baseline || this model) of the next-token distribution in "
     "nats on the evaluation windows (token-perplexity tasks; also in metrics with top1_agreement); "
     "null for the baseline itself and for other tasks"),
    ("metrics", pa.list_(METRIC), "all metrics of the cell with their definitions (stderr, n; "
     "accuracy-type metrics also a Wilson 95% interval)"),
    ("examples", pa.list_(EXAMPLE), "per-example outcomes (correct, rank, NLL per window/document) "
     "for paired comparisons with the baseline"),
    # size
    ("weight_bytes", _I, "bytes of all weights: quantized layers as their format stores them (codes, "
     "scales, zero points, g_idx where stored: see layers), the parts left unquantized at "
     "dense_parts_dtype (the baseline's dtype, whatever dtype an engine computes them in), so two "
     "methods at the same bits and group size differ only by what each stores per group"),
    ("dense_parts_dtype", _S, "dtype the unquantized parts (embeddings, norms, a kept lm_head) are "
     "counted at in weight_bytes: the model's dtype from the spec, the baseline's; null for rows of "
     "schema 1, which counted them at the dtype they computed in"),
    ("weight_bytes_source", _S, "'stored' (bytes of a saved artifact) or 'packed-arithmetic' "
     "(exact count of codes, scales and zeros a packed format stores; the model ran dequantized)"),
    ("bits_per_weight", _F, "effective bits per weight of quantized layers, scales and zeros included"),
    ("bits_per_weight_model", _F, "8 * weight_bytes / params_total: bits per weight of the whole model, "
     "unquantized parts included (a quantized lm_head lowers it; bits_per_weight covers only the "
     "quantized layers)"),
    ("baseline_weight_bytes", _I, "bytes of the same model's weights unquantized, in the dtype it was loaded in"),
    ("compression_ratio", _F, "baseline_weight_bytes / weight_bytes: above 1 the quantized weights are "
     "smaller as stored; memory while running is model_bytes_in_memory, a different figure"),
    ("checkpoint_format", _S, "format of the checkpoint the method saved (gptq, awq, compressed-tensors, ...); "
     "null when it saved none (qsweep export then writes the dequantized model)"),
    ("checkpoint_bytes", _I, "bytes of the saved checkpoint's weight files on disk; null when none was saved"),
    ("params_total", _I, "weights of the model, counted the same for every format: the unquantized "
     "parts' elements (tied tensors once) plus in x out of each quantized layer"),
    ("params_quantized", _I, "weights in quantized layers: in x out of each (padding and packing excluded)"),
    ("layers_quantized", _I, "linear layers quantized"),
    ("layers_fallback", _I, "quantized layers whose width the group size does not divide (see fallback)"),
    ("layers_high_precision", _I, "linear layers left in the model's dtype"),
    ("fallback", _S, "group_fallback policy applied to layers the group size does not divide: ragged | "
     "largest_divisor | pad | skip_layer; null when every layer divides"),
    ("layers", pa.list_(LAYER), "per linear layer: quantized or kept (reason), bits, requested "
     "group size, group layout actually used (e.g. 4x128+64), fallback, relative weight error "
     "||W - Q(W)|| / ||W||, for gsq the chosen exponent scale_alpha of the input-channel scales, and "
     "after pruning the achieved sparsity (zero fraction), the pattern asked for and the bytes of a "
     "sparse-stored weight"),
    ("weight_format", _S, "dense (unquantized) | fake-quant (dequantized weights) | a packed format | "
     "sparse-bitmask (a pruned model's weights as compressed-tensors' bitmask layout stores them)"),
    ("sparsity", _F, "fraction of zero weights over the linear layers but the output head, measured on "
     "the evaluated model (after every stage: a quantizer may fill the pruned weights back in); null "
     "for cells without a pruning method or prune stage"),
    ("sparse_format", _S, "the format whose bytes weight_bytes counts for the sparsity: 'sparse-bitmask' "
     "(values + one bit per weight + row offsets, a file written and read back); null when the pruned "
     "weights are stored as dense values or quantized codes, so that the sparsity saves no bytes"),
    ("activation_quant", _S, "how the evaluated model quantized its activations, e.g. 'int8 dynamic per "
     "token' (W8A8); null = activations not quantized (weight-only): cells that differ here are "
     "different schemes, whatever their method name"),
    ("quant_details", _S, "JSON of what the method reported beyond the per-layer record (the engine's "
     "effective quantize config, checkpoint format, SmoothQuant calibration, ...); null when nothing"),
    ("kernel", _S, "kernel path evaluated and profiled: 'dense' (unquantized), 'dequantized' (low-bit "
     "weights held dequantized: no packed low-bit kernel ran, so speed says nothing of a packed format), "
     "'decompressed' (sparse weights held dense: no sparse kernel ran) or a packed kernel's name"),
    # speed and memory
    ("device", _S, "device the cell ran on: cpu or cuda:N"),
    # evaluation memory: peaks during this cell's evaluation (its own batch size and lengths)
    ("peak_rss_bytes", _I, "peak resident set size (CPU memory) of the actor process during this "
     "cell's evaluation: the Linux kernel's high-water mark (VmHWM) reset at the start, else sampled "
     "every 20 ms; includes everything the process holds (the base model the actor keeps too)"),
    ("cuda_peak_allocated_bytes", _I, "peak bytes in live torch CUDA tensors during this cell's "
     "evaluation (torch.cuda.max_memory_allocated, reset at the start); null on CPU"),
    ("cuda_peak_reserved_bytes", _I, "peak bytes held by torch's CUDA caching allocator during this "
     "cell's evaluation (torch.cuda.max_memory_reserved, cache emptied and reset at the start); null on CPU"),
    ("nvml_peak_process_bytes", _I, "peak GPU memory of the actor process per NVML "
     "(nvmlDeviceGetComputeRunningProcesses, device matched by UUID; CUDA context and allocator "
     "pool included) during this cell's evaluation, sampled every 20 ms; null on CPU or when NVML "
     "cannot see the process"),
    ("compute_dtype", _S, "dtype the evaluated model's unquantized parts computed in; differs from dtype "
     "when an engine changes it (GPTQModel's CPU kernels run in bfloat16): compare such cells with care"),
    ("model_bytes_in_memory", _I, "bytes of the model's parameters and buffers as held for evaluation"),
    ("resident_base_bytes", _I, "bytes the actor kept for the baseline beside this cell's model, in "
     "the memory its peak figures measure, while it evaluated and profiled: on CPU the base model's "
     "parameters and buffers and the baseline log-probs held in memory for KL stay in the "
     "process's RSS, so peak_rss_bytes - resident_base_bytes is the cell's own "
     "(baseline_deltas.memory_bytes uses that); on CUDA the base is moved to host memory first "
     "and the log-probs live there, so 0 and the CUDA and NVML figures are the cell's own; 0 for "
     "the baseline (its model is the base); null for rows of schema 1"),
    # profile: measured after evaluation, on the model as held (see weight_format / kernel)
    ("profile_device", _S, "device every profile figure is for: 'cpu <processor>' or 'cuda:N <GPU name>'"),
    ("profile_backend", _S, "inference backend profiled: 'transformers' (the model's PyTorch forward with "
     "its KV cache, greedy decode loop as generate() runs it). Speed of a dequantized model "
     "(kernel = 'dequantized') is that of dense matmuls, not a claim about a packed format"),
    ("profile_prompt_len", _I, "prompt tokens per sequence in every profile run: consecutive slices of "
     "the first tokens of this cell's dataset (no special tokens, no padding)"),
    ("profile_gen_len", _I, "new tokens per sequence in every profile run, exactly (greedy, no stop at EOS)"),
    ("profile_batch_sizes", pa.list_(_I), "batch sizes profiled, ascending (1 always: latency is at batch "
     "size 1); each one's throughput and memory are in metrics as <name>@bs<N>"),
    ("profile_warmup", _I, "untimed warm-up runs before the timed runs at each batch size, excluded from every figure"),
    ("profile_repeats", _I, "timed runs at each batch size; every latency and throughput figure is their "
     "median, with min and max in the _min / _max columns"),
    ("ttft_ms", _F, "time to first token in ms at batch size 1: prefill of profile_prompt_len tokens plus "
     "the first greedy token, synchronised (CUDA events on GPU); median over profile_repeats runs"),
    ("ttft_ms_min", _F, "min over the runs of ttft_ms"),
    ("ttft_ms_max", _F, "max over the runs of ttft_ms"),
    ("tpot_p50_ms", _F, "per-output-token latency in ms at batch size 1: p50 over a run's "
     "profile_gen_len - 1 decode steps (each one forward of one token with the KV cache, synchronised), "
     "median over profile_repeats runs"),
    ("tpot_p50_ms_min", _F, "min over the runs of tpot_p50_ms"),
    ("tpot_p50_ms_max", _F, "max over the runs of tpot_p50_ms"),
    ("tpot_p95_ms", _F, "per-output-token latency in ms at batch size 1: p95 (linear interpolation) over a "
     "run's decode steps, median over profile_repeats runs"),
    ("tpot_p95_ms_min", _F, "min over the runs of tpot_p95_ms"),
    ("tpot_p95_ms_max", _F, "max over the runs of tpot_p95_ms"),
    ("throughput_tok_s", _F, "output tokens per second at batch size 1: profile_gen_len / wall time of the "
     "run (prefill and every decode step); median over profile_repeats runs; other batch sizes in "
     "metrics as throughput_tok_s@bs<N>"),
    ("throughput_tok_s_min", _F, "min over the runs of throughput_tok_s"),
    ("throughput_tok_s_max", _F, "max over the runs of throughput_tok_s"),
    ("gen_peak_rss_bytes", _I, "peak resident set size (CPU memory) of the actor process at batch size 1 during the profile's warm-up and timed runs "
     "(VmHWM reset at the start, else sampled every 20 ms; the actor's base model included); "
     "other batch sizes in metrics as gen_peak_rss_bytes@bs<N>"),
    ("gen_cuda_peak_allocated_bytes", _I, "peak bytes in live torch CUDA tensors at batch size 1 during the profile's warm-up and timed runs "
     "(torch.cuda.max_memory_allocated); null on CPU"),
    ("gen_cuda_peak_reserved_bytes", _I, "peak bytes held by torch's CUDA caching allocator at batch size 1 during the profile's warm-up and timed runs "
     "(torch.cuda.max_memory_reserved, cache emptied first); null on CPU"),
    ("gen_nvml_peak_process_bytes", _I, "peak GPU memory of the actor process per NVML at batch size 1 during the profile's warm-up and timed runs, sampled "
     "every 20 ms (CUDA context and allocator pool included); null on CPU or when NVML cannot see the process"),
    ("gen_kv_cache_bytes", _I, "bytes of the KV cache tensors at the end of a batch-size-1 run "
     "(profile_prompt_len + profile_gen_len tokens)"),
    # provenance
    ("host", _S, "host name of the actor"),
    ("actor", _S, "actor that ran the cell (pid@host)"),
    ("gpu_name", _S, "GPU name; null on CPU"),
    ("actor_gpus", _I, "GPUs Ray gave the actor that ran the cell (the model entry's gpus_per_actor; "
     "its layers spread over them); 0 on a CPU actor; null for rows written before schema 4"),
    ("torch_threads", _I, "torch intra-op threads in the actor"),
    ("model_loads", _I, "model loads this actor had done when the cell finished"),
    ("versions", _S, "library versions as JSON (python, torch, transformers, qsweep, ...)"),
    ("time_load_s", _F, "wall seconds to get the base model (load or copy from the actor's cache); shared by the group"),
    ("time_quantize_s", _F, "wall seconds to copy the base model and quantize it; shared by the cells of "
     "the group; 0 when the quantized model came from the artifact cache"),
    ("artifact_cache_hit", _B, "true: the quantized model came from the artifact cache (qsweep run "
     "--artifact-cache); false: quantized and stored there; null: no cache, or storing the entry "
     "failed (logged; the rows are unaffected)"),
    ("time_evaluate_s", _F, "wall seconds of this cell's evaluation (data preparation included)"),
    ("time_profile_s", _F, "wall seconds of this cell's profile: size accounting (once per group, the "
     "same in each of its cells) plus this cell's latency, throughput and memory runs"),
    ("time_overhead_s", _F, "orchestration overhead for this cell: the driver's wait for its row "
     "minus the actor's own wall time for it (Ray scheduling, serialisation, transport); the "
     "group's share around load+quantize is added to its first cell"),
    ("started_at", _T, "when the cell's group started on the actor"),
    ("finished_at", _T, "when this cell's row was made (the host's clock: never used to order rows; "
     "see write_generation)"),
    ("checked_on", _S, "where the preflight checks of this cell ran: 'driver <host>' (spec-level "
     "facts: shapes, capabilities) or 'worker <host>' (facts of the machines cells run on: model "
     "directories, dataset files, memory)"),
    ("reused_from", _S, "where this row's results came from when the sweep reused a cell another sweep "
     "of the store had finished ok ('<sweep> (run <run_id>)'); the row is that sweep's, re-stamped "
     "with this sweep's name; null when this sweep ran the cell"),
    # writer's sequence: the order of a cell's rows, whatever the hosts' clocks say
    ("run_id", _S, "the driver run that wrote this row: '<host>:<pid>:g<write_generation>'"),
    ("write_generation", _I, "generation of the sweep's lease held by the driver that wrote this row: "
     "each driver that takes the lease gets the previous generation + 1, so a later run always has "
     "a larger one; null for rows written without a lease (schema 1)"),
    ("write_seq", _I, "rows this driver run had written before this one (0, 1, 2, ...): with "
     "write_generation, the order in which a cell's rows were written. A cell with several rows "
     "reads as its ok row if it has one (an ok row is final unless --rerun), else its last written"),
]

# How readers, compaction and views order a cell's rows (first = the one that counts): an ok row
# before any other, then by the writer's sequence, then (rows of schema 1) by the clock.
ROW_ORDER = (("status_ok", "descending"), ("write_generation", "descending"),
             ("write_seq", "descending"), ("finished_at", "descending"))
ROW_ORDER_SQL = ("(status = 'ok') desc, write_generation desc nulls last, write_seq desc nulls last, "
                 "finished_at desc nulls last")
# Columns renamed since schema 1, old name -> new name: readers map them (see upgrade_table).
RENAMED: dict[str, str] = {}

SCHEMA = pa.schema([pa.field(name, dtype, metadata={"doc": doc}) for name, dtype, doc in COLUMNS])
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)


def upgrade_table(table: pa.Table) -> pa.Table:
    """A table of any earlier schema version as the current schema: renamed columns mapped
    (the new name wins where both are set), missing columns null, unknown ones dropped."""
    columns = {}
    for name, dtype, _ in COLUMNS:
        old = next((o for o, new in RENAMED.items() if new == name and o in table.column_names), None)
        if name in table.column_names:
            column = table.column(name)
            if old is not None:
                column = pa.compute.coalesce(column, table.column(old).cast(dtype))
        elif old is not None:
            column = table.column(old)
        else:
            column = pa.nulls(table.num_rows, dtype)
        columns[name] = column.cast(dtype)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) to a table of the schema; unknown keys are an error, missing ones null."""
    for row in rows:
        unknown = set(row) - set(COLUMN_NAMES)
        if unknown:
            raise KeyError(f"row has columns not in the schema: {sorted(unknown)}")
        if row.get("status") not in STATUSES:
            raise ValueError(f"row status {row.get('status')!r} not in {STATUSES}")
    return pa.Table.from_pylist([{n: r.get(n) for n in COLUMN_NAMES} for r in rows], schema=SCHEMA)
