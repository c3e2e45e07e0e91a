"""The report of ``bench/gpu_run.py``: the CPU-vs-GPU comparison of the sweep's rows and the
printed text, from the phases' JSON (torch-free)."""

from __future__ import annotations

from typing import Any

from gpu_phases import TOLERANCE

MiB, GB = 2**20, 1e9
TARGET_RATIO = 1.5  # packed int4 batch-1 decode vs bf16 on the 8B shape (issue 23)


def _label(row: dict) -> str:
    engine = row["params"].get("engine")
    extra = "" if row["params"].get("sym") is None else (" sym" if row["params"]["sym"] else " asym")
    size = "" if row["bits"] is None else f" {row['bits']}b g{row['group_size']}"
    return f"{row['method']}{'/' + engine if engine else ''}{extra}{size}"


def compare(sweep: dict | None, reference: dict | None, device: str) -> dict:
    """Each cell's perplexity on the device against the CPU reference's, within TOLERANCE."""
    from tasks.quantize.registry import get_method

    if not sweep or not sweep.get("rows"):
        return {"status": "skipped", "reason": "the sweep phase produced no rows", "cells": []}
    if not reference or not reference.get("rows"):
        return {"status": "skipped", "reason": "the CPU reference phase produced no rows", "cells": []}
    theirs = {row["cell_id"]: row for row in reference["rows"]}
    cells, outside = [], 0
    for row in sweep["rows"]:
        cpu = theirs.get(row["cell_id"], {})
        kind = "calibrated" if get_method(row["method"]).calibrated(row["params"]) else "data-free"
        entry = {"cell": _label(row), "cell_id": row["cell_id"], "kind": kind, "tolerance": TOLERANCE[kind],
                 "device_ppl": row.get("primary_value") if row.get("status") == "ok" else None,
                 "cpu_ppl": cpu.get("primary_value") if cpu.get("status") == "ok" else None,
                 "device_kernel": row.get("kernel"), "cpu_kernel": cpu.get("kernel")}
        if entry["device_ppl"] is None or entry["cpu_ppl"] is None:
            why = [f"{where}: {r.get('status')} ({r.get('error_message') or 'no row'})"
                   for where, r in (("device", row), ("cpu", cpu)) if r.get("status") != "ok"]
            entry |= {"verdict": "not compared", "reason": "; ".join(why)[:600]}
        else:
            difference = entry["device_ppl"] / entry["cpu_ppl"] - 1
            within = abs(difference) <= entry["tolerance"]
            outside += not within
            entry |= {"relative_difference": difference, "verdict": "within" if within else "OUTSIDE"}
        cells.append(entry)
    compared = sum(1 for c in cells if c["verdict"] != "not compared")
    note = ("both runs on the CPU (smoke run): the comparison exercises the code path, not a kernel"
            if device == "cpu" else "device rows against the same cells run on this machine's CPU")
    return {"status": "ok", "note": note, "compared": compared, "outside": outside, "cells": cells}


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / MiB:,.0f}"


def _num(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def skipped_items(results: dict) -> list[tuple[str, str]]:
    """(what, why) for everything not measured: phases, cells, figures."""
    items = []
    for name, phase in results["phases"].items():
        if phase.get("status") not in ("ok", "partial"):
            items.append((f"phase {name}: {phase.get('status')}", phase.get("reason") or "no reason recorded"))
    figures = results.get("figures") or {}

    def walk(prefix: str, data: Any) -> None:
        if isinstance(data, dict):
            for key, value in data.items():
                if key == "skipped" and isinstance(value, dict):
                    items.extend((f"{prefix}{what}", why) for what, why in value.items())
                elif key != "rows":
                    walk(f"{prefix}{key}: ", value)

    for name in ("env", "decode", "memory"):
        walk(f"{name}: ", figures.get(name))
    for name in ("sweep", "reference"):
        for row in (figures.get(name) or {}).get("rows", []):
            if row.get("status") != "ok":
                items.append((f"{name} cell {_label(row)}: {row.get('status')}",
                              (row.get("error_message") or "no reason recorded")[:400]))
    comparison = results.get("comparison") or {}
    if comparison.get("status") != "ok":
        items.append(("CPU-vs-device comparison", comparison.get("reason") or "not run"))
    return items


def _sweep_lines(results: dict) -> list[str]:
    figures = results.get("figures") or {}
    sweep, comparison = figures.get("sweep") or {}, results.get("comparison") or {}
    lines = ["", f"== (a) demo-style sweep on {sweep.get('device', '?')} vs the CPU reference"]
    built = sweep.get("model") or {}
    lines.append(f"model: smollm2-shaped {built.get('config')}, {built.get('params', 0):,} params; "
                 f"{built.get('weights')}; train loss {_num(built.get('train_loss_first'))} -> "
                 f"{_num(built.get('train_loss_last'))}")
    lines.append(f"tolerance on |ppl_device / ppl_cpu - 1|: {TOLERANCE['data-free']:.0%} data-free, "
                 f"{TOLERANCE['calibrated']:.0%} calibrated; {comparison.get('note', comparison.get('reason', ''))}")
    by_id = {c["cell_id"]: c for c in comparison.get("cells", [])}
    lines.append(f"{'cell':<28} {'status':<8} {'kernel':<44} {'ppl dev':>9} {'ppl cpu':>9} {'diff':>7} "
                 f"{'verdict':<13} {'tok/s@1':>8} {'w MiB':>6}")
    for row in sweep.get("rows", []):
        c = by_id.get(row["cell_id"], {})
        lines.append(f"{_label(row):<28} {row.get('status', '?'):<8} {str(row.get('kernel') or '-')[:44]:<44} "
                     f"{_num(c.get('device_ppl'), '9.3f')} {_num(c.get('cpu_ppl'), '9.3f')} "
                     f"{_num(c.get('relative_difference'), '+7.2%')} {c.get('verdict', '-'):<13} "
                     f"{_num(row.get('throughput_tok_s'), '8.1f')} {_mib(row.get('weight_bytes')):>6}")
    if comparison.get("status") == "ok":
        lines.append(f"compared {comparison['compared']} cells, {comparison['outside']} outside the tolerance")
    return lines


def _decode_lines(results: dict) -> list[str]:
    figures = results.get("figures") or {}
    decode, env = figures.get("decode") or {}, figures.get("env") or {}
    gpu = env.get("gpu") or {}
    lines = ["", "== (b) decode speed (random weights: speed only, no quality)"]
    if gpu:
        lines.append(f"bandwidth limit: {_num((gpu.get('bandwidth_datasheet_Bps') or 0) / 1e12)} TB/s "
                     f"({gpu.get('bandwidth_source')}); measured device-to-device copy "
                     f"{_num((gpu.get('copy_bandwidth_Bps') or 0) / 1e12)} TB/s (read + written)")
    lines.append("fraction = (weight bytes read per step + KV bytes read per step) / step p50 / bandwidth; "
                 "a step reads every weight once (the input embedding: one row per sequence, not counted)")
    ratios = []
    for shape, record in (decode.get("shapes") or {}).items():
        lines.append(f"-- {shape}: {record.get('model', {}).get('params', 0):,} params, load "
                     f"{_num(record.get('load_s'), '.1f')} s")
        lines.append(f"   {'format':<6} {'bs':>3} {'TTFT ms':>9} {'p50 ms':>8} {'p95 ms':>8} {'tok/s':>9} "
                     f"{'GB/step':>8} {'frac ds':>8} {'frac cp':>8} {'graph ms':>9} {'alloc':>7} {'resv':>7} "
                     f"{'nvml':>7} {'rss':>7} MiB")
        formats = {}
        for fmt in ("bf16", "int4"):
            data = record.get(fmt) or {}
            graph = {g["batch_size"]: g["step_ms"] for g in data.get("graph", [])}
            formats[fmt] = {b["batch_size"]: b for b in data.get("batches") or []}
            if fmt == "int4" and data.get("kernel"):
                lines.append(f"   int4: {data['kernel']}, {data.get('bits_per_weight') and round(data['bits_per_weight'], 3)} "
                             f"bits/weight over {data.get('layers_quantized')} layers")
            for b in data.get("batches") or []:
                lines.append(f"   {fmt:<6} {b['batch_size']:>3} {b['ttft_ms']:9.2f} {b['tpot_p50_ms']:8.3f} "
                             f"{b['tpot_p95_ms']:8.3f} {b['tokens_per_s']:9.1f} "
                             f"{(b['weight_bytes_read_per_step'] + b['kv_bytes_read_per_step']) / GB:8.3f} "
                             f"{_num(b.get('bandwidth_fraction_datasheet'), '8.1%')} "
                             f"{_num(b.get('bandwidth_fraction_copy'), '8.1%')} "
                             f"{_num(graph.get(b['batch_size']), '9.3f')} {_mib(b['cuda_allocated_bytes']):>7} "
                             f"{_mib(b['cuda_reserved_bytes']):>7} {_mib(b['nvml_process_bytes']):>7} "
                             f"{_mib(b['rss_bytes']):>7}")
        bf16, int4 = formats["bf16"].get(1), formats["int4"].get(1)
        if bf16 and int4:
            speedup = bf16["tpot_p50_ms"] / int4["tpot_p50_ms"]
            ideal = ((bf16["weight_bytes_read_per_step"] + bf16["kv_bytes_read_per_step"])
                     / (int4["weight_bytes_read_per_step"] + int4["kv_bytes_read_per_step"]))
            ratios.append((shape, speedup, ideal, bf16, int4, record))
    for shape, speedup, ideal, bf16, int4, record in ratios:
        lines.append(f"int4/bf16 at batch 1 on {shape}: {speedup:.2f}x per step (bytes read: {ideal:.2f}x fewer)"
                     + (f"; target >= {TARGET_RATIO}x: {'MET' if speedup >= TARGET_RATIO else 'NOT MET'}"
                        if "8b" in shape else ""))
        graphs = {fmt: {g["batch_size"]: g["step_ms"] for g in (record.get(fmt) or {}).get("graph", [])}
                  for fmt in ("bf16", "int4")}
        if graphs["bf16"].get(1) and graphs["int4"].get(1):
            lines.append(f"   where the rest went: eager step p50 {bf16['tpot_p50_ms']:.3f} / {int4['tpot_p50_ms']:.3f} ms "
                         f"(bf16 / int4) vs the same step replayed as a CUDA graph {graphs['bf16'][1]:.3f} / "
                         f"{graphs['int4'][1]:.3f} ms: host launch overhead {bf16['tpot_p50_ms'] - graphs['bf16'][1]:.3f} "
                         f"/ {int4['tpot_p50_ms'] - graphs['int4'][1]:.3f} ms a step; graph-replay ratio "
                         f"{graphs['bf16'][1] / graphs['int4'][1]:.2f}x; the rest is the kernels' distance from "
                         f"the bandwidth limit ({_num(int4.get('bandwidth_fraction_datasheet'), '.0%')} for int4)")
    return lines


def _memory_lines(results: dict) -> list[str]:
    memory = (results.get("figures") or {}).get("memory") or {}
    lines = ["", "== (c) memory accounting of one GPTQ group (stage peaks vs orchestrator.preflight.memory_plan)"]
    if not memory.get("stages"):
        return lines + ["(not measured: see the skipped list)"]
    lines.append(f"cell: {memory['cell']}; kernel {memory.get('kernel')}; base model during evaluation on "
                 f"{memory.get('base_device_during_evaluate')}, resident_base_bytes {memory.get('resident_base_bytes')}")
    lines.append(f"plan: {memory.get('plan_explain')}")
    lines.append(f"{'stage':<10} {'plan MiB':>9} {'alloc pk':>9} {'resv pk':>9} {'nvml pk':>9} {'rss pk':>9} "
                 f"{'alloc/plan':>10} {'alloc after':>11} {'seconds':>8}")
    plan = memory.get("plan", {})
    for stage, data in memory["stages"].items():
        planned = (plan.get(stage) or {}).get("bytes")
        peak = data["peak"]
        ratio = peak.get("cuda_allocated_bytes") / planned if planned and peak.get("cuda_allocated_bytes") else None
        lines.append(f"{stage:<10} {_mib(planned):>9} {_mib(peak.get('cuda_allocated_bytes')):>9} "
                     f"{_mib(peak.get('cuda_reserved_bytes')):>9} {_mib(peak.get('nvml_process_bytes')):>9} "
                     f"{_mib(peak.get('rss_bytes')):>9} {_num(ratio, '10.2f')} "
                     f"{_mib(data['after'].get('cuda_allocated_bytes')):>11} {data['seconds']:8.1f}")
    decode = memory.get("decode") or {}
    for b in decode.get("batches") or []:
        lines.append(f"   packed GPTQ decode bs {b['batch_size']:>3}: p50 {b['tpot_p50_ms']:.3f} ms, "
                     f"{b['tokens_per_s']:.1f} tok/s, fraction of datasheet bandwidth "
                     f"{_num(b.get('bandwidth_fraction_datasheet'), '.1%')}")
    return lines


def render(results: dict) -> str:
    figures = results.get("figures") or {}
    env = figures.get("env") or {}
    lines = [f"qsweep issue 23: {results['mode']} run on {results['device']} (budget {results['budget_s']:.0f} s)"]
    gpu = env.get("gpu")
    lines.append(f"versions: {env.get('versions')}")
    if gpu:
        lines.append(f"GPU: {gpu['name']}, capability {gpu['capability']}, {gpu['memory_bytes'] / 2**30:.1f} GiB, "
                     f"driver {gpu['driver']}")
    prebuild = figures.get("prebuild") or {}
    for name, built in (prebuild.get("extensions") or {}).items():
        lines.append(f"GPTQModel JIT kernel {name}: {'built' if built['ok'] else 'NOT built'} in "
                     f"{built['seconds']:.0f} s{'' if built['ok'] else ': ' + str(built['error'])[:300]}")
    lines += _decode_lines(results) + _sweep_lines(results) + _memory_lines(results)
    lines += ["", "== not measured, with the reason"]
    lines += [f"- {what}: {why}" for what, why in skipped_items(results)] or ["(nothing)"]
    lines += ["", "== phases"]
    lines += [f"{name:<10} {phase.get('status'):<8} {_num(phase.get('seconds'), '6.1f')} s  {phase.get('reason') or ''}"
              for name, phase in results["phases"].items()]
    return "\n".join(lines) + "\n"
