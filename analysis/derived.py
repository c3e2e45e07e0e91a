"""Views that turn rows into decisions: ``baseline_deltas``, ``pareto``, ``table1``, ``sensitivity``.

Built on ``cells``, ``metrics`` and ``examples`` (analysis.views) and ``metric_directions``
(analysis.quality). Columns:

- ``baseline_deltas``: one row per (ok quantized cell, quality metric) joined to the ok baseline
  of the same model identity (model_path and dtype, not its name), dataset identity (dataset_path,
  task, settings, limit) and seed, from any sweep of the store (its own sweep's preferred, then
  the last written).
  Identity (sweep, cell_id, model, method, method_params, bits, group_size, config, dataset,
  metric, is_primary, higher_is_better), baseline_cell_id, baseline_value, value,
  ``delta`` (value - baseline), ``relative_delta_pct`` (100 * delta / |baseline|),
  ``quality_drop`` (how much worse, in the metric's units: > 0 worse, < 0 better),
  ``relative_drop_pct``, ``recovery_pct`` (100 * value / baseline when higher is better,
  100 * baseline / value when lower is better), ``delta_stderr`` (paired from the per-example
  records when both cells have them, else sqrt(se^2 + se_baseline^2)), ``paired_n``,
  ``test`` (the test that ran: sign-flip-exact | sign-flip-monte-carlo | mcnemar-exact |
  mcnemar-chi2-cc | null; analysis.quality), ``p_value``, ``p_value_resolution`` (the smallest
  p-value that test could give here), ``paired_unit`` (the per-example record paired, e.g.
  window_nll) with ``paired_ci95_low`` / ``paired_ci95_high`` (95% interval of the mean paired
  difference in that unit, inverting the sign-flip test; null when unbounded or for McNemar),
  ``discordant_better`` /
  ``discordant_worse`` (McNemar's pairs), size (weight_bytes, baseline_weight_bytes,
  ``weight_change_pct``, ``compression_ratio`` = baseline / quantized, bits_per_weight),
  speed and memory (kernel, weight_format, ``speed_claim`` = false for a dequantized
  fake-quant kernel, ttft_ms, tpot_p50_ms, throughput_tok_s and the baseline's
  ``baseline_tpot_p50_ms``, ``compute_dtype`` / ``baseline_compute_dtype`` / ``dtype_differs``
  (an engine that computes in bfloat16 against a float32 baseline), ``memory_bytes`` with ``memory_kind`` = the first measured of
  nvml_peak_process_bytes, cuda_peak_reserved_bytes, peak_rss_bytes less resident_base_bytes
  (the base model an actor keeps in host memory beside a quantized cell on CPU): the cell's own
  memory), ``kl_divergence`` (measured), ``predicted_kl`` and ``allocation`` (what ``qsweep
  allocate`` predicted for a cell of the spec it wrote, and its JSON; null for any other cell),
  ``sensitivity_unit`` (a sensitivity study's unit cell: one unit quantized, the rest kept; table1
  leaves these out) and ``anomaly``: null,
  or '; '-joined flags: ``beats baseline beyond its uncertainty`` (better with p < 0.05, or by
  more than 1.96 delta_stderr when unpaired), ``non-finite metric``, ``larger than baseline``,
  ``evaluated on calibration text`` (calibration_overlap above 1%), ``no measurable change at
  <= 4 bits`` (KL divergence from the baseline below 1e-3: the source weights may already lie on
  the quantizer's grid, as SmolLM2's dequantized Q4_1 weights do at 4 bits group 32).
- ``pareto``: the non-dominated ok cells per (model, dataset, primary metric) over quality
  (direction-aware), weight_bytes (lower) and per-token latency tpot_p50_ms (lower; a cell
  without latency counts as infinitely slow). Columns: model, dataset, metric, cell_id,
  method, method_params, bits, group_size, config, score, weight_bytes, bits_per_weight,
  latency_ms, kernel, speed_claim.
- ``engine_agreement``: the same cell quantized by two engines (method, bits, group size and
  parameters equal but ``engine``; a ``group_fallback`` no layer needed is ignored): both primary
  values, ``delta``, ``delta_stderr`` (paired over the per-example records when both have them,
  else from the two stderrs), ``p_value`` and ``test`` (paired sign-flip) and ``disagree``: the engines differ
  beyond their uncertainty (p < 0.05, or |delta| > 1.96 delta_stderr when unpaired).
- ``sensitivity``: one row per ok unit cell of a sensitivity study (orchestrator.sensitivity:
  one override pattern quantized, every other layer kept): sweep, model, dataset, ``unit_kind``
  (block | type | layer), ``unit`` (the block index, the layer type such as mlp.down_proj, or the
  layer's name), ``block``, pattern, method, method_params, bits, group_size, ``option``
  (' w<bits> g<group>'), cell_id, kl_divergence, metric, value, baseline_value, delta,
  quality_drop, ``unit_params`` (weights in the unit's layers), ``unit_bits_per_weight`` and
  ``unit_bytes`` (the unit's layers as the format stores them), weight_bytes (the whole model).
- ``table1``: the seed paper's Table 1 shape, one row per baseline (model, dataset, metric):
  baseline_score, best_quantized_score (best primary score among quantized cells with no
  anomaly), best_method (its config), bits, group_size, recovery_pct, p_value,
  baseline_weight_mb, quantized_weight_mb, memory_change_pct (weight bytes, quantized vs
  baseline), quantized_cells, flagged_cells (set aside for an anomaly).
"""

from __future__ import annotations

import atexit
import weakref

import duckdb

from analysis.front import front_udf
from analysis.quality import (
    NO_CHANGE_KL,
    SIGNIFICANCE,
    directions_table,
    mcnemar_test,
    sign_flip_test,
)

# method(params without braces, quotes and spaces) w<bits> g<group size>; translate() drops the
# four characters in one pass over the string
CONFIG_LABEL = """{t}method || coalesce('(' || nullif(translate({t}method_params, '{{}}" ', ''), '') || ')', '')
       || coalesce(' w' || {t}bits, '') || coalesce(' g' || {t}group_size, '')"""

# A sensitivity study's unit cell (orchestrator.sensitivity): one override pattern quantized,
# then everything kept ('*', keep). The LIKE spares the JSON functions every other row.
UNIT_CELL = """({t}method_params like '%"overrides"%'
              and json_array_length(json_extract({t}method_params, '$.overrides')) = 2
              and json_extract_string({t}method_params, '$.overrides[1].pattern') = '*'
              and coalesce(json_extract({t}method_params, '$.overrides[1].keep')::boolean, false))"""

# The columns of an ok row that baseline_deltas reads, and the model's and dataset's identity:
# the path, else the name.
OK_ROWS = """
            select sweep, cell_id, model, dtype, method, method_params, bits, group_size, task, seed,
                   write_generation, write_seq, dataset, eval_settings, "limit", finished_at, primary_metric,
                   primary_value, primary_stderr, metrics,
                   weight_bytes, bits_per_weight, kernel, weight_format, calibration_overlap, kl_divergence,
                   compute_dtype, ttft_ms, tpot_p50_ms, throughput_tok_s,
                   coalesce(nvml_peak_process_bytes, cuda_peak_reserved_bytes,
                            peak_rss_bytes - coalesce(resident_base_bytes, 0)) as memory_bytes,
                   case when nvml_peak_process_bytes is not null then 'nvml_peak_process_bytes'
                        when cuda_peak_reserved_bytes is not null then 'cuda_peak_reserved_bytes'
                        when peak_rss_bytes is not null and resident_base_bytes > 0
                             then 'peak_rss_bytes - resident_base_bytes'
                        when peak_rss_bytes is not null then 'peak_rss_bytes' end as memory_kind,
                   case when model_path is null then 'name:' || model else 'path:' || model_path end as model_key,
                   case when dataset_path is null then 'name:' || dataset else 'path:' || dataset_path end as dataset_key
            from {source} where {where}"""

# One row per (ok row of OK_ROWS, metric); the metric's direction and test come with its
# baseline (analysis.quality's metric_directions joined to the few baselines). The primary
# metric comes from the row's flat columns (the same Metric the worker put in ``metrics``), the
# others from ``metrics``: a query of primary metrics alone never reads or unnests that list.
QUALITY = """
            select * exclude (metrics, primary_value, primary_stderr), primary_metric as metric,
                   primary_value as value, primary_stderr as stderr, true as is_primary
            from {source}
            union all
            select * exclude (metrics, primary_value, primary_stderr, m), m.metric as metric,
                   m.value as value, m.stderr as stderr, false as is_primary
            from (select *, unnest(metrics) as m from {source})
            where m.metric is distinct from primary_metric"""

# Every ok row, as a subquery (inlined wherever it is named)
OK_LATEST = "(" + OK_ROWS.format(source="latest_rows", where="status = 'ok'") + ")"
OK_WITH_RECORDS = "(" + OK_ROWS.format(source="latest_rows", where="status = 'ok' and len(examples) > 0") + ")"


def same_baseline_identity(a: str, b: str) -> str:
    """SQL: rows ``a`` and ``b`` share the identity a baseline is matched on (model path and
    dtype, dataset path, task, settings and limit, seed) and the metric."""
    equal = [f"{a}.{key} = {b}.{key}" for key in ("model_key", "dataset_key", "metric")]
    same = [f"{a}.{key} is not distinct from {b}.{key}" for key in ("dtype", "task", "eval_settings", '"limit"', "seed")]
    return " and ".join(equal + same)


# Per-example records, one list per row write identity (a row held twice, as a compaction
# killed before it deleted its sources leaves it, counts once), unnested.
RECORDS_BY_ROW = """
            select cell_id, write_generation, write_seq, finished_at, e.example_id as example_id,
                   e.metric as metric, e.value as value
            from (select r.cell_id, r.write_generation, r.write_seq, r.finished_at, unnest(first(r.examples)) as e
                  from {source} where {where}
                  group by r.cell_id, r.write_generation, r.write_seq, r.finished_at)"""

DERIVED_VIEWS = {
    # Each cell meets its baseline by hash joins on the identity (the store's few baselines
    # ranked beforehand), never by ranking every candidate pair.
    "baseline_deltas": f"""
        create or replace view baseline_deltas as
        -- Every CTE over the whole store is named once (a CTE named twice is materialized whole
        -- before any filter applies): QUALITY's two copies of its source and with_records'
        -- copy of QUALITY are inlined text, so a query of primary metrics never reads or
        -- unnests the metrics lists and each copy reads only the columns it needs.
        with quality as ({QUALITY.format(source=OK_LATEST)}),
        baseline_quality as (
            select q.*, d.higher_is_better, d.example_metric, d.test, d.scale
            from ({QUALITY.format(source="baseline_rows")}) q
            join metric_directions d on d.metric = q.metric
        ),
        -- the baseline of the same model identity (path and dtype, whatever its name), the same
        -- dataset identity (path, task, settings, limit) and the same seed, from any sweep of the
        -- store: its own sweep's preferred, then the last written. Names alone pair an 8B
        -- 'llama' with a 70B one.
        baselines as (
            select model_key, dtype, dataset_key, task, metric, eval_settings, "limit", seed, sweep,
                   {{'cell_id': cell_id, 'value': value, 'stderr': stderr, 'weight_bytes': weight_bytes,
                     'tpot_p50_ms': tpot_p50_ms, 'memory_bytes': memory_bytes,
                     'compute_dtype': compute_dtype, 'write_generation': write_generation,
                     'write_seq': write_seq, 'finished_at': finished_at, 'higher_is_better': higher_is_better,
                     'example_metric': example_metric, 'test': test, 'scale': scale}} as b,
                   row_number() over (partition by model_key, dtype, dataset_key, task, metric, eval_settings,
                                                   "limit", seed
                                      order by write_generation desc nulls last, write_seq desc nulls last,
                                               finished_at desc) as rank_any,
                   row_number() over (partition by model_key, dtype, dataset_key, task, metric, eval_settings,
                                                   "limit", seed, sweep
                                      order by write_generation desc nulls last, write_seq desc nulls last,
                                               finished_at desc) as rank_in_sweep
            from baseline_quality
        ),
        -- The choice made once per (baseline identity, sweep of the store), a small table, so
        -- that each quantized row meets its baseline in one hash join.
        chosen as (
            select a.model_key, a.dtype, a.dataset_key, a.task, a.metric, a.eval_settings, a."limit", a.seed,
                   w.sweep, coalesce(s.b, a.b) as b
            from (select * from baselines where rank_any = 1) a
            cross join store_sweeps w
            left join baselines s on s.rank_in_sweep = 1 and s.sweep = w.sweep and {same_baseline_identity("s", "a")}
        ),
        pairs as (
            select q.*, c.b
            from quality q
            join chosen c on c.sweep = q.sweep and {same_baseline_identity("c", "q")}
            where q.method <> 'baseline'
        ),
        pairs_flat as (
            select * exclude (b), b.cell_id as baseline_cell_id, b.value as baseline_value,
                   b.stderr as baseline_stderr, b.weight_bytes as baseline_weight_bytes,
                   b.tpot_p50_ms as baseline_tpot_p50_ms, b.memory_bytes as baseline_memory_bytes,
                   b.compute_dtype as baseline_compute_dtype, b.higher_is_better as higher_is_better,
                   b.example_metric as example_metric, b.test as test, b.scale as scale
            from pairs
        ),
        -- Per-example records of the rows compared, joined by each row's write identity (the row
        -- its cell was ranked by), streamed once from the store: the quantized rows' records
        -- here, the baselines' from baseline_examples (small, found at connect). A row held
        -- twice (a compaction killed before it deleted its sources; only repeated_cells can be)
        -- counts once. Only the quantized rows that have records meet their baselines a second
        -- time, by their keys.
        example_values as (
            select cell_id, write_generation, write_seq, finished_at, e.example_id as example_id,
                   e.metric as metric, e.value as value
            from (select r.*, unnest(examples) as e from raw_rows r anti join repeated_cells d using (cell_id)
                  where status = 'ok' and method <> 'baseline' and len(examples) > 0)
            union all
            {RECORDS_BY_ROW.format(source="raw_rows r semi join repeated_cells d using (cell_id)",
                                   where="status = 'ok' and method <> 'baseline' and len(examples) > 0")}
        ),
        with_records as (
            select q.cell_id, q.metric, q.write_generation, q.write_seq, q.finished_at, c.b
            from ({QUALITY.format(source=OK_WITH_RECORDS)}) q
            join chosen c on c.sweep = q.sweep and {same_baseline_identity("c", "q")}
            where q.method <> 'baseline'
        ),
        paired as (
            select p.cell_id, p.metric, count(*) as n,
                   avg(eq.value) as mean_q, avg(eb.value) as mean_b,
                   coalesce(var_samp(eq.value), 0) as var_q, coalesce(var_samp(eb.value), 0) as var_b,
                   coalesce(covar_samp(eq.value, eb.value), 0) as cov_qb,
                   count(*) filter (where eq.value > eb.value) as q_higher,
                   count(*) filter (where eq.value < eb.value) as q_lower,
                   list(eq.value - eb.value) as diffs
            from with_records p
            join example_values eq on eq.cell_id = p.cell_id and eq.metric = p.b.example_metric
                 and eq.write_generation is not distinct from p.write_generation
                 and eq.write_seq is not distinct from p.write_seq and eq.finished_at is not distinct from p.finished_at
            join baseline_examples eb on eb.cell_id = p.b.cell_id and eb.metric = p.b.example_metric
                 and eb.example_id = eq.example_id
                 and eb.write_generation is not distinct from p.b.write_generation
                 and eb.write_seq is not distinct from p.b.write_seq
                 and eb.finished_at is not distinct from p.b.finished_at
            group by p.cell_id, p.metric
        ),
        tested as (
            select p.*, t.n as paired_n,
                   case when t.n is null then sqrt(p.stderr ^ 2 + p.baseline_stderr ^ 2)
                        when p.scale = 'exp' then sqrt(greatest(exp(2 * t.mean_q) * t.var_q + exp(2 * t.mean_b) * t.var_b
                                                                - 2 * exp(t.mean_q + t.mean_b) * t.cov_qb, 0) / t.n)
                        else sqrt(greatest(t.var_q + t.var_b - 2 * t.cov_qb, 0) / t.n) end as delta_stderr,
                   case when p.higher_is_better then t.q_higher else t.q_lower end as discordant_better,
                   case when p.higher_is_better then t.q_lower else t.q_higher end as discordant_worse,
                   case when t.n is null then null
                        when p.test = 'mcnemar' then qsweep_mcnemar(t.q_higher, t.q_lower)
                        when p.test = 'sign-flip' then qsweep_sign_flip(t.diffs) end as paired
            from pairs_flat p left join paired t on t.cell_id = p.cell_id and t.metric = p.metric
        ),
        tested_out as (
            select * exclude (paired), paired.test as test_used, paired.p_value as p_value,
                   paired.resolution as p_value_resolution, paired.ci95_low as paired_ci95_low,
                   paired.ci95_high as paired_ci95_high
            from tested
        ),
        -- an allocation's prediction (qsweep allocate) for the cells of the spec it wrote
        predicted as (
            select cell_id, arg_min(predicted_kl, allocation_id) as predicted_kl,
                   arg_min(allocation, allocation_id) as allocation
            from allocations group by cell_id
        ),
        scored as (
            select t.*, t.value - t.baseline_value as delta,
                   case when t.higher_is_better then t.baseline_value - t.value
                        else t.value - t.baseline_value end as quality_drop,
                   p.predicted_kl, p.allocation
            from tested_out t left join predicted p on p.cell_id = t.cell_id
        )
        select sweep, cell_id, model, method, method_params, bits, group_size, config, dataset,
               metric, is_primary, higher_is_better, baseline_cell_id, baseline_value, value, delta,
               100 * delta / nullif(abs(baseline_value), 0) as relative_delta_pct,
               quality_drop, 100 * quality_drop / nullif(abs(baseline_value), 0) as relative_drop_pct,
               case when higher_is_better then 100 * value / nullif(baseline_value, 0)
                    else 100 * baseline_value / nullif(value, 0) end as recovery_pct,
               delta_stderr, paired_n, test_used as test, p_value, p_value_resolution,
               example_metric as paired_unit, paired_ci95_low, paired_ci95_high,
               discordant_better, discordant_worse,
               weight_bytes, baseline_weight_bytes,
               100 * (weight_bytes / nullif(baseline_weight_bytes, 0) - 1) as weight_change_pct,
               baseline_weight_bytes / nullif(weight_bytes, 0) as compression_ratio, bits_per_weight,
               kernel, weight_format, coalesce(kernel not in ('dequantized', 'decompressed'), false) as speed_claim,
               compute_dtype, baseline_compute_dtype,
               compute_dtype is distinct from baseline_compute_dtype as dtype_differs,
               ttft_ms, tpot_p50_ms, throughput_tok_s, baseline_tpot_p50_ms,
               memory_bytes, memory_kind, baseline_memory_bytes,
               kl_divergence, predicted_kl, allocation, {UNIT_CELL.format(t='')} as sensitivity_unit,
               nullif(concat_ws('; ',
                   case when quality_drop < 0 and (p_value < {SIGNIFICANCE}
                             or (p_value is null and -quality_drop > 1.96 * delta_stderr))
                        then 'beats baseline beyond its uncertainty' end,
                   case when not coalesce(isfinite(value) and isfinite(baseline_value), false)
                        then 'non-finite metric' end,
                   case when weight_bytes > baseline_weight_bytes then 'larger than baseline' end,
                   case when calibration_overlap > 0.01 then 'evaluated on calibration text' end,
                   -- a model dequantized from a low-bit file (SmolLM2's Q4_1 GGUF: 4 bits, blocks
                   -- of 32, float offset) is reproduced exactly by a quantizer on the same grid
                   case when bits <= 4 and kl_divergence < {NO_CHANGE_KL}
                        then 'no measurable change at <= 4 bits: the source weights may already be on this grid' end),
                   '') as anomaly
        -- each distinct configuration's label, built once per connection (config_labels): a
        -- million new strings cost more than a hash join against a few hundred
        from scored left join config_labels on label_method = method and label_params is not distinct from method_params
             and label_bits is not distinct from bits and label_group_size is not distinct from group_size
    """,
    # A sort and a sweep (analysis.front), not a self-join. First, per weight level of a front
    # (hash aggregates, no sort), each level's best and fastest points and the best and fastest
    # of the lighter levels drop the points they dominate; each front's survivors then go to
    # the sweep as one list, and only the cells on the front are labelled.
    "pareto": f"""
        create or replace view pareto as
        with points as (
            select c.model, c.dataset, c.primary_metric as metric, c.cell_id, c.method, c.method_params,
                   c.bits, c.group_size, c.primary_value, c.weight_bytes, c.bits_per_weight, c.tpot_p50_ms,
                   c.kernel, case when d.higher_is_better then primary_value else -primary_value end as q,
                   coalesce(tpot_p50_ms, 'infinity'::double) as lat
            from cells c join metric_directions d on d.metric = c.primary_metric
            where status = 'ok' and isfinite(primary_value) and weight_bytes is not null
        ),
        levels as (
            select *, max(top_q) over lighter as lighter_top_q, arg_max(top_lat, top_q) over lighter as lighter_top_lat,
                   min(fast_lat) over lighter as lighter_fast_lat, arg_min(fast_q, fast_lat) over lighter as lighter_fast_q
            from (select model, dataset, metric, weight_bytes, max(q) as top_q, arg_max(lat, q) as top_lat,
                         min(lat) as fast_lat, arg_min(q, lat) as fast_q
                  from points group by all)
            window lighter as (partition by model, dataset, metric order by weight_bytes
                               range between unbounded preceding and 1 preceding)
        ),
        candidates as materialized (
            select p.* from points p join levels l using (model, dataset, metric, weight_bytes)
            where not coalesce((l.top_q >= p.q and l.top_lat <= p.lat and (l.top_q > p.q or l.top_lat < p.lat))
                               or (l.fast_q >= p.q and l.fast_lat <= p.lat and (l.fast_q > p.q or l.fast_lat < p.lat))
                               or (l.lighter_top_q >= p.q and l.lighter_top_lat <= p.lat)
                               or (l.lighter_fast_q >= p.q and l.lighter_fast_lat <= p.lat), false)
        ),
        front as (
            select unnest(list_where(objectives, qsweep_front(objectives))).cell_id as cell_id
            from (select list({{'q': q, 'w': weight_bytes, 'lat': lat, 'cell_id': cell_id}}) as objectives
                  from candidates group by model, dataset, metric)
        )
        select model, dataset, metric, cell_id, method, method_params, bits, group_size,
               {CONFIG_LABEL.format(t='')} as config, primary_value as score, weight_bytes, bits_per_weight,
               tpot_p50_ms as latency_ms, kernel, coalesce(kernel not in ('dequantized', 'decompressed'), false) as speed_claim
        from candidates semi join front using (cell_id)
    """,
    "engine_agreement": f"""
        create or replace view engine_agreement as
        with ok as (
            select cell_id, model, dataset, method, bits, group_size, primary_metric as metric,
                   primary_value as value, primary_stderr as stderr, json_extract_string(method_params, '$.engine') as engine,
                   activation_quant,
                   -- the config without its engine (and without a fallback policy no layer needed)
                   json_merge_patch(method_params, case when fallback is null
                       then '{{"engine": null, "group_fallback": null}}' else '{{"engine": null}}' end) as config_key
            from cells where status = 'ok' and method_params like '%"engine"%'
        ),
        pairs as (
            select a.model, a.dataset, a.method, a.bits, a.group_size, a.metric, a.config_key,
                   a.engine as engine_a, b.engine as engine_b, a.cell_id as cell_a, b.cell_id as cell_b,
                   a.value as value_a, b.value as value_b, a.stderr as stderr_a, b.stderr as stderr_b
            from ok a join ok b on a.model = b.model and a.dataset = b.dataset and a.method = b.method
                 and a.bits is not distinct from b.bits and a.group_size is not distinct from b.group_size
                 and a.metric = b.metric and a.config_key = b.config_key and a.engine < b.engine
                 -- W8A8 against weight-only is two schemes, not two engines of one
                 and a.activation_quant is not distinct from b.activation_quant
        ),
        paired as (
            select p.cell_a, p.cell_b, count(*) as n, list(ea.value - eb.value) as diffs,
                   var_samp(ea.value - eb.value) as var_diff, avg(ea.value) as mean_a, avg(eb.value) as mean_b
            from pairs p
            join metric_directions d on d.metric = p.metric
            join examples ea on ea.cell_id = p.cell_a and ea.metric = d.example_metric
            join examples eb on eb.cell_id = p.cell_b and eb.metric = d.example_metric and eb.example_id = ea.example_id
            group by p.cell_a, p.cell_b
        ),
        compared as (
        select p.model, p.dataset, p.method, p.bits, p.group_size, p.metric, p.engine_a, p.engine_b,
               p.value_a, p.value_b, p.value_a - p.value_b as delta,
               coalesce(case when t.n > 1 and d.scale = 'exp'
                             then exp((t.mean_a + t.mean_b) / 2) * sqrt(t.var_diff / t.n)
                             when t.n > 1 then sqrt(t.var_diff / t.n) end,
                        sqrt(p.stderr_a ^ 2 + p.stderr_b ^ 2)) as delta_stderr,
               case when t.n > 1 then 'paired' else 'unpaired' end as stderr_kind,
               case when t.n > 1 then (qsweep_sign_flip(t.diffs)).p_value end as p_value,
               case when t.n > 1 then (qsweep_sign_flip(t.diffs)).test end as test,
               p.cell_a, p.cell_b
        from pairs p
        join metric_directions d on d.metric = p.metric
        left join paired t on t.cell_a = p.cell_a and t.cell_b = p.cell_b
        )
        select *, coalesce(p_value < {SIGNIFICANCE}, abs(delta) > 1.96 * delta_stderr, false) as disagree
        from compared
        order by model, dataset, method, bits, group_size
    """,
    # One row per ok unit cell of a sensitivity study (orchestrator.sensitivity): its overrides
    # quantize one pattern and keep everything else ('*', keep). The unit is read back from the
    # pattern; its stored bytes are its quantized layers' (bits per weight x weights / 8).
    "sensitivity": r"""
        create or replace view sensitivity as
        with units as (
            select sweep, cell_id, model, dtype, dataset, method, method_params, bits, group_size, kl_divergence,
                   primary_metric, primary_value, params_quantized, bits_per_weight, weight_bytes,
                   json_extract_string(method_params, '$.overrides[0].pattern') as pattern
            from cells
            where status = 'ok' and """ + UNIT_CELL.format(t="") + r"""
        )
        select u.sweep, u.model, u.dtype, u.dataset,
               case when regexp_matches(pattern, '^.+\.[0-9]+\.\*$') then 'block'
                    when regexp_matches(pattern, '^.+?\.\*\..+$') then 'type' else 'layer' end as unit_kind,
               case when regexp_matches(pattern, '^.+\.[0-9]+\.\*$')
                    then regexp_extract(pattern, '^.+\.([0-9]+)\.\*$', 1)
                    when regexp_matches(pattern, '^.+?\.\*\..+$') then regexp_extract(pattern, '^.+?\.\*\.(.+)$', 1)
                    else pattern end as unit,
               try_cast(regexp_extract(pattern, '\.([0-9]+)\.', 1) as integer) as block,
               pattern, u.method, u.method_params, u.bits, u.group_size,
               coalesce(' w' || u.bits, '') || coalesce(' g' || u.group_size, '') as option,
               u.cell_id, u.kl_divergence, u.primary_metric as metric, u.primary_value as value,
               d.baseline_value, d.delta, d.quality_drop,
               u.params_quantized as unit_params, u.bits_per_weight as unit_bits_per_weight,
               u.bits_per_weight * u.params_quantized / 8 as unit_bytes, u.weight_bytes
        from units u left join baseline_deltas d on d.cell_id = u.cell_id and d.is_primary
        order by u.model, u.dataset, unit_kind, block nulls last, unit, u.bits, u.group_size
    """,
    "table1": """
        create or replace view table1 as
        with base as (
            select cell_id, model, dataset, primary_metric as metric, primary_value, weight_bytes
            from baseline_rows
        ),
        -- a sensitivity study's unit cells (one unit quantized, the rest in dtype) are
        -- measurements, not configs to deploy. One hash aggregate per baseline: the best clean
        -- cell (least drop, then fewest bytes, then cell_id) and the counts; only the chosen
        -- cell's label is built.
        per_baseline as (
            select baseline_cell_id,
                   arg_min({'value': value, 'method': method, 'method_params': method_params, 'bits': bits,
                            'group_size': group_size, 'recovery_pct': recovery_pct, 'p_value': p_value,
                            'weight_bytes': weight_bytes, 'weight_change_pct': weight_change_pct},
                           {'drop': quality_drop, 'bytes': weight_bytes, 'cell_id': cell_id})
                       filter (where anomaly is null) as best,
                   count(*) as quantized_cells, count(*) filter (where anomaly is not null) as flagged_cells
            from baseline_deltas where is_primary and not sensitivity_unit
            group by baseline_cell_id
        )
        select base.model, base.dataset, base.metric, base.primary_value as baseline_score,
               best.value as best_quantized_score, """ + CONFIG_LABEL.format(t="best.") + """ as best_method,
               best.bits, best.group_size, best.recovery_pct, best.p_value,
               base.weight_bytes / 1e6 as baseline_weight_mb, best.weight_bytes / 1e6 as quantized_weight_mb,
               best.weight_change_pct as memory_change_pct,
               coalesce(p.quantized_cells, 0) as quantized_cells,
               coalesce(p.flagged_cells, 0) as flagged_cells
        from base
        left join per_baseline p on p.baseline_cell_id = base.cell_id
        order by base.model, base.dataset, base.metric
    """,
}


def prepare(con: duckdb.DuckDBPyConnection) -> None:
    """What the derived views need before they are created: the direction table and the
    paired tests (analysis.quality), each returning a struct (test, p_value, resolution,
    ci95_low, ci95_high)."""
    con.register("metric_directions", directions_table())
    result = duckdb.struct_type({"test": "VARCHAR", "p_value": "DOUBLE", "resolution": "DOUBLE",
                                 "ci95_low": "DOUBLE", "ci95_high": "DOUBLE"})
    con.create_function("qsweep_sign_flip", _sign_flip_row, ["DOUBLE[]"], result, side_effects=False,
                        null_handling="special")
    con.create_function("qsweep_mcnemar", _mcnemar_row, ["BIGINT", "BIGINT"], result, side_effects=False)
    objectives = duckdb.list_type(duckdb.struct_type({"q": "DOUBLE", "w": "BIGINT", "lat": "DOUBLE",
                                                          "cell_id": "VARCHAR"}))
    con.create_function("qsweep_front", front_udf, [objectives], duckdb.list_type("BOOLEAN"), type="arrow",
                        side_effects=False)
    # A connection holding a Python function must be closed before the interpreter exits.
    ref = weakref.ref(con)
    atexit.register(lambda: (c := ref()) is not None and c.close())


def _sign_flip_row(diffs: list[float] | None) -> dict | None:
    result = sign_flip_test(diffs)
    return None if result is None else vars(result)


def _mcnemar_row(higher: int, lower: int) -> dict:
    return vars(mcnemar_test(higher, lower))


def seal(con: duckdb.DuckDBPyConnection, readable: list[str] | None = None) -> None:
    """After the views exist: no file or network access (but reading ``readable``, the store's
    own files, which the views read), no extension, no Python variables as tables, and no way
    for a query to undo it. DuckDB's allowed paths cannot be made read-only, so a caller that
    runs a user's SQL on a connection with ``readable`` files runs only queries
    (``check_read_only``)."""
    if readable:
        con.execute("set allowed_paths = $paths", {"paths": readable})
    for setting in ("enable_external_access", "python_enable_replacements", "allow_community_extensions"):
        con.execute(f"set {setting} = false")
    con.execute("set lock_configuration = true")


READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise ``duckdb.PermissionException`` unless every statement of ``sql`` only reads
    (a SELECT, DESCRIBE or SHOW, or its EXPLAIN): no COPY, no CREATE, no SET, no PRAGMA."""
    for statement in con.extract_statements(sql):
        kind = statement.type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise duckdb.PermissionException(
                f"{kind} statements are not run here: qsweep query answers queries (SELECT) over "
                "the store's views; write results with --format csv|json|parquet --out FILE")
