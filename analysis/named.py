"""Named queries: ``qsweep query NAME`` runs one of these instead of SQL."""

from __future__ import annotations

NAMED_QUERIES: dict[str, tuple[str, str]] = {
    "table1": ("the seed paper's Table 1: baseline vs best quantized score and memory change",
               "select * from table1"),
    "pareto": ("non-dominated cells per model and dataset (quality, weight bytes, latency)",
               ("select model, dataset, metric, config, score, weight_bytes, bits_per_weight, latency_ms, "
               "kernel, speed_claim from pareto order by model, dataset, weight_bytes")),
    "deltas": ("every quantized cell's primary metric vs its baseline, with the paired test",
               ("select model, dataset, metric, config, baseline_value, value, delta, recovery_pct, "
               "delta_stderr, test, p_value, weight_change_pct, anomaly from baseline_deltas "
               "where is_primary order by model, dataset, recovery_pct desc")),
    "anomalies": ("cells flagged in baseline_deltas (not wins: check them)",
                  ("select model, dataset, metric, config, baseline_value, value, p_value, weight_bytes, "
                  "baseline_weight_bytes, anomaly from baseline_deltas where anomaly is not null "
                  "order by model, dataset, metric")),
    "engines": ("the same cell quantized by two engines: both values, the difference and whether they "
                "disagree beyond their uncertainty",
                ("select model, dataset, method, bits, group_size, metric, engine_a, engine_b, value_a, value_b, "
                 "delta, delta_stderr, stderr_kind, p_value, disagree from engine_agreement")),
    "sizes": ("weights per ok cell: bits per weight, bytes by the packed arithmetic and as saved on disk "
              "(their ratio), compression against the baseline, layers quantized / fallen back / kept",
              ("select model, method, json_extract_string(method_params, '$.engine') as engine, bits, group_size, "
               "weight_format, round(bits_per_weight, 4) as bits_per_weight, weight_bytes, checkpoint_bytes, "
               "round(checkpoint_bytes / weight_bytes, 4) as checkpoint_over_weight_bytes, "
               "round(compression_ratio, 3) as compression_ratio, layers_quantized, layers_fallback, "
               "layers_high_precision, fallback from cells where status = 'ok' "
               "order by model, method, engine, bits, group_size")),
    "failures": ("cells that did not finish ok, with their reason",
                 ("select status, error_class, error_stage, model, method, bits, group_size, dataset, "
                 "error_message from cells where status <> 'ok' order by status, error_class, model")),
    "summary": ("cells per model, dataset and status",
                "select model, dataset, status, count(*) as cells from cells group by all order by all"),
}


def resolve(text: str) -> str:
    """The SQL of a named query, or ``text`` itself."""
    entry = NAMED_QUERIES.get(text.strip())
    return entry[1] if entry else text


def describe() -> str:
    return "; ".join(f"{name} ({doc})" for name, (doc, _) in NAMED_QUERIES.items())
