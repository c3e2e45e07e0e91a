"""Analysis views, recommend and the query CLI on a small synthetic store (seconds, no model)."""

from __future__ import annotations

import datetime as dt
import json
import math
import random

import pyarrow.parquet as pq
import pytest

from analysis.quality import mcnemar_p, sign_flip_p
from analysis.recommend import Budget, BudgetError, parse_bytes, recommend
from analysis.views import connect
from orchestrator.cli import main
from orchestrator.store import Store

AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
BASE_BYTES = 500_000_000


def cell(cell_id, method="rtn", bits=4, group_size=64, dataset="bq", status="ok", value=None,
         correct=None, nll=None, weight_bytes=None, tpot=50.0, model="m", sym=True):
    """One row; ``correct`` (0/1 per example) makes an ``acc`` dataset, ``nll`` (per window) a
    token-perplexity one."""
    quantized = method != "baseline"
    row = {"schema_version": 1, "sweep": "s", "cell_id": cell_id, "model": model, "dtype": "float32",
           "method": method, "method_params": json.dumps({"sym": sym}) if quantized else "{}",
           "bits": bits if quantized else None, "group_size": group_size if quantized else None,
           "dataset": dataset, "eval_settings": "{}", "status": status, "finished_at": AT, "started_at": AT,
           "weight_bytes": weight_bytes or (BASE_BYTES * bits // 16 + BASE_BYTES // (8 * group_size)
                                            if quantized else BASE_BYTES),
           "bits_per_weight": bits + 0.25 if quantized else None,
           "kernel": "dequantized" if quantized else "dense", "tpot_p50_ms": tpot,
           "peak_rss_bytes": 2 * BASE_BYTES}
    if status != "ok":
        return {**row, "error_class": "oom", "error_message": "out of memory"}
    if correct is not None:
        metric, examples = "acc", [{"example_id": str(i), "metric": "acc", "value": float(c)}
                                   for i, c in enumerate(correct)]
        value = sum(correct) / len(correct) if value is None else value
    else:
        metric, examples = "token_perplexity", [{"example_id": str(i), "metric": "window_nll", "value": v}
                                                for i, v in enumerate(nll)]
        value = math.exp(sum(nll) / len(nll)) if value is None else value
    return {**row, "primary_metric": metric, "primary_value": value, "primary_stderr": 0.05,
            "metrics": [{"metric": metric, "value": value, "stderr": 0.05, "n": len(examples)}],
            "examples": examples}


def make_store(path) -> str:
    """baseline + 4 quantized cells on ``bq`` (accuracy over 40 examples), one of them better than
    the baseline beyond chance; baseline + 2 cells on ``ppl``; a NaN, a failed and a skipped cell."""
    base = [1] * 30 + [0] * 10
    rows = [
        cell("b-bq", method="baseline", correct=base, tpot=120.0),
        cell("q4g64", correct=[1] * 29 + [0] * 11, tpot=60.0),                   # drop 0.025
        cell("q4g128", group_size=128, correct=[1] * 27 + [0] * 13, tpot=55.0),  # drop 0.075
        cell("q3g64", bits=3, correct=[1] * 20 + [0] * 20, tpot=40.0),           # drop 0.25
        cell("big", group_size=32, correct=[1] * 30 + [0] * 10, weight_bytes=BASE_BYTES + 1),
        cell("lucky", group_size=16, correct=[1] * 40),                          # 10 discordant, all better
        cell("nan", bits=2, correct=[0] * 40, value=float("nan")),
        cell("oom", bits=8, status="failed"),
        cell("skip", bits=8, group_size=128, status="skipped"),
        cell("b-ppl", method="baseline", dataset="ppl", nll=[2.0, 2.1, 2.2, 2.3, 2.4, 2.5]),
        cell("p4", dataset="ppl", nll=[2.1, 2.2, 2.3, 2.4, 2.5, 2.6]),
        cell("p3", bits=3, dataset="ppl", nll=[2.4, 2.6, 2.5, 2.9, 2.8, 3.0]),
    ]
    Store(path).write_rows(rows)
    return str(path)


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "results")


def test_every_view_returns_rows(store):
    con = connect(store)
    for view in ("cells", "metrics", "examples", "columns", "metric_directions", "baseline_deltas",
                 "pareto", "table1"):
        assert con.execute(f"select count(*) from {view}").fetchone()[0] > 0, view


def test_baseline_deltas_values_and_paired_tests(store):
    con = connect(store)
    rows = {r[0]: r[1:] for r in con.execute(
        "select cell_id, delta, quality_drop, recovery_pct, test, p_value, discordant_better, "
        "discordant_worse, paired_n, anomaly from baseline_deltas").fetchall()}
    delta, drop, recovery, test, p, better, worse, n, anomaly = rows["q4g64"]
    assert delta == pytest.approx(-0.025) and drop == pytest.approx(0.025)
    assert recovery == pytest.approx(100 * 29 / 30)
    assert (test, better, worse, n) == ("mcnemar-exact", 0, 1, 40)
    assert p == pytest.approx(mcnemar_p(0, 1)) and anomaly is None
    # 10 discordant pairs, all in the quantized cell's favour: p = 2 / 2^10
    assert rows["lucky"][4] == pytest.approx(2 / 1024)
    assert rows["lucky"][8] == "beats baseline beyond its uncertainty"
    assert rows["big"][8] == "larger than baseline"
    assert "non-finite metric" in rows["nan"][8]
    assert "oom" not in rows and "skip" not in rows  # only ok cells are compared
    # perplexity: lower is better, recovery = baseline / quantized, sign-flip test on window NLL:
    # 6 equal differences, exact over 2^6 patterns, only the all-plus and all-minus as extreme
    p4 = rows["p4"]
    assert p4[1] > 0 and p4[2] == pytest.approx(100 * math.exp(2.25) / math.exp(2.35))
    assert p4[3] == "sign-flip-exact" and p4[4] == pytest.approx(2 / 64) == sign_flip_p([0.1] * 6)
    assert p4[8] is None
    (resolution, unit, low, high), = con.execute(
        "select p_value_resolution, paired_unit, paired_ci95_low, paired_ci95_high from baseline_deltas "
        "where cell_id = 'p4'").fetchall()
    assert resolution == pytest.approx(2 / 64) and unit == "window_nll"
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)  # no spread: a point


def test_paired_statistics():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(0.0625)
    assert mcnemar_p(3, 3) == 1.0
    assert sign_flip_p([0.0] * 5) == 1.0
    rng = random.Random(0)
    noise = [rng.gauss(0, 1) for _ in range(200)]
    assert sign_flip_p(noise) > 0.05           # no shift: not significant
    assert sign_flip_p([x + 1 for x in noise]) < 0.01
    assert sign_flip_p(noise) == sign_flip_p(noise)  # deterministic


def test_pareto_matches_brute_force(tmp_path):
    rng = random.Random(1)
    rows = []
    for i in range(120):
        group = i % 2
        rows.append(cell(f"c{i}", dataset=f"ppl{group}", nll=[rng.uniform(1, 3)],
                         weight_bytes=rng.choice([100, 200, 300, 400]), tpot=rng.choice([None, 10.0, 20.0, 30.0])))
    Store(tmp_path).write_rows(rows)
    got = {r[0] for r in connect(str(tmp_path)).execute("select cell_id from pareto").fetchall()}

    def key(r):  # all minimised
        return (r["primary_value"], r["weight_bytes"], math.inf if r["tpot_p50_ms"] is None else r["tpot_p50_ms"])

    def dominated(r):
        return any(o["dataset"] == r["dataset"] and all(a <= b for a, b in zip(key(o), key(r)))
                   and key(o) != key(r) for o in rows)
    assert got == {r["cell_id"] for r in rows if not dominated(r)}
    assert len(got) >= 2


def _dominated_brute(points):
    """Points as (q, w, lat) tuples, all three to be minimised: the indices no other beats."""
    return {i for i, p in enumerate(points)
            if not any(all(a <= b for a, b in zip(o, p)) and o != p for o in points)}


@pytest.mark.parametrize("sweep_by_level", [False, True])
def test_front_mask_equals_brute_force_with_ties(monkeypatch, sweep_by_level):
    import numpy as np

    from analysis import front
    if sweep_by_level:  # the level-by-level sweep a group with many distinct weights takes
        monkeypatch.setattr(front, "MATRIX_LIMIT", 0)
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        groups = rng.integers(0, 3, n)
        q = rng.integers(0, 4, n).astype(float)
        w = rng.integers(0, 4, n) * 100
        lat = rng.choice([1.0, 2.0, 3.0, math.inf], n)
        got = front.front_mask_grouped(groups, q, w, lat)
        for g in set(groups.tolist()):
            idx = [i for i in range(n) if groups[i] == g]
            keep = _dominated_brute([(-q[i], w[i], lat[i]) for i in idx])
            assert {idx[k] for k in keep} == {i for i in idx if got[i]}


def test_pareto_equals_brute_force_on_a_random_store_with_ties(tmp_path):
    """Two models, two datasets of each direction, values, sizes and latencies drawn from a few
    levels (ties on every objective, exact duplicates, cells without latency), NaN, failed
    cells and cells without a size: the view equals the non-dominated cells per front."""
    rng = random.Random(22)
    rows = []
    for i in range(400):
        model, dataset = f"m{i % 2}", ["acc0", "acc1", "ppl0", "ppl1"][i // 2 % 4]
        kw = dict(model=model, dataset=dataset, weight_bytes=rng.choice([100, 200, 300]),
                  tpot=rng.choice([None, 10.0, 20.0, 30.0]), bits=rng.choice([2, 3, 4]))
        if dataset.startswith("acc"):
            row = cell(f"c{i}", correct=[1, 0], value=rng.choice([0.5, 0.6, 0.7]), **kw)
        else:
            row = cell(f"c{i}", nll=[1.0], value=rng.choice([5.0, 6.0, 7.0]), **kw)
        if i % 37 == 0:
            row = cell(f"c{i}", status="failed", **kw)
        elif i % 41 == 0:
            row = {**row, "primary_value": float("nan")}
        elif i % 43 == 0:
            row = {**row, "weight_bytes": None}
        rows.append(row)
    Store(tmp_path).write_rows(rows)
    got = {r[0] for r in connect(str(tmp_path)).execute("select cell_id from pareto").fetchall()}

    fronts = {}
    for r in rows:
        if r["status"] == "ok" and math.isfinite(r["primary_value"]) and r["weight_bytes"] is not None:
            fronts.setdefault((r["model"], r["dataset"], r["primary_metric"]), []).append(r)
    expected = set()
    for (_, _, metric), members in fronts.items():
        sign = -1 if metric == "acc" else 1  # minimise sign * value
        points = [(sign * r["primary_value"], r["weight_bytes"],
                   math.inf if r["tpot_p50_ms"] is None else r["tpot_p50_ms"]) for r in members]
        expected |= {members[k]["cell_id"] for k in _dominated_brute(points)}
    assert got == expected
    assert len(fronts) == 8 and len(expected) >= 16
    # ties: some front has two identical points, both kept
    identical = [(r["model"], r["dataset"], r["primary_value"], r["weight_bytes"], r["tpot_p50_ms"])
                 for r in rows if r["cell_id"] in expected]
    assert len(identical) > len(set(identical))


def test_table1_best_excludes_anomalies(store):
    rows = connect(store).execute(
        "select dataset, metric, baseline_score, best_quantized_score, best_method, memory_change_pct, "
        "quantized_cells, flagged_cells from table1 order by dataset").fetchall()
    assert rows[0][:5] == ("bq", "acc", 0.75, 0.725, "rtn(sym:true) w4 g64")
    assert rows[0][5] == pytest.approx(-75.0, abs=0.5) and rows[0][6:] == (6, 3)
    assert rows[1][:2] == ("ppl", "token_perplexity") and rows[1][4] == "rtn(sym:true) w4 g64"


def test_recommend_feasible_infeasible_and_binding(store):
    con = connect(store)
    answer = recommend(con, "bq", Budget(max_drop=0.1, max_weight_bytes=parse_bytes("200MB")))
    assert [r["cell_id"] for r in answer.picks] == ["q4g128", "q4g64"]  # smallest first
    assert {r["cell_id"] for r in answer.set_aside} == {"lucky", "big", "nan"}
    answer = recommend(con, "bq", Budget(max_drop=0.1), rank="quality")
    assert [r["cell_id"] for r in answer.picks][:2] == ["b-bq", "q4g64"]
    answer = recommend(con, "bq", Budget(max_drop=0.01, max_weight_bytes=200_000_000))
    assert answer.picks == [] and answer.binding == ["max-drop", "max-weight-bytes"]
    answer = recommend(con, "bq", Budget(max_drop=0.3, max_latency_ms=30))  # fastest is 40 ms
    assert answer.picks == [] and answer.binding == ["max-latency-ms"]
    assert "closest: rtn(sym:true) w3 g64 at tpot_p50_ms = 40" in answer.diagnosis[1]
    assert [r["cell_id"] for r in recommend(con, "bq", Budget(min_recovery=96)).picks] == ["q4g64", "b-bq"]
    assert [r["cell_id"] for r in recommend(con, "bq", Budget(max_drop=5, max_drop_relative=True)).picks] \
        == ["q4g64", "b-bq"]
    with pytest.raises(BudgetError, match="datasets with results: bq, ppl"):
        recommend(con, "nope", Budget())
    with pytest.raises(BudgetError, match="available: acc"):
        recommend(con, "bq", Budget(), metric="rank")


def test_parse_bytes():
    assert parse_bytes("170MB") == 170_000_000
    assert parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes("2e8") == 200_000_000
    with pytest.raises(ValueError):
        parse_bytes("12XB")


def test_recommend_cli(store, capsys):
    assert main(["recommend", "--results", store, "--dataset", "bq", "--max-drop", "0.1",
                 "--max-weight-bytes", "200MB"]) == 0
    out = capsys.readouterr().out
    assert "1. m rtn(sym:true) w4 g128" in out and "mcnemar-exact p=" in out and "not a packed-kernel claim" in out
    assert "set aside: m rtn(sym:true) w4 g16: beats baseline beyond its uncertainty" in out
    assert main(["recommend", "--results", store, "--dataset", "bq", "--max-drop", "0.01",
                 "--max-latency-ms", "45"]) == 0
    out = capsys.readouterr().out
    assert "no config meets the budget" in out and "binding:" in out
    assert main(["recommend", "--results", store, "--dataset", "nope"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["recommend", "--results", store, "--dataset", "bq", "--max-memory", "lots"])
    assert exc.value.code == 2


def test_query_named_formats_and_seal(store, tmp_path, capsys):
    assert main(["query", "--results", store, "table1"]) == 0
    assert "best_quantized_score" in capsys.readouterr().out
    assert main(["query", "--results", store, "sizes", "--format", "json"]) == 0
    sizes = json.loads(capsys.readouterr().out)
    assert {(r["method"], r["bits"], r["group_size"]) for r in sizes} >= {("baseline", None, None), ("rtn", 3, 64)}
    assert all(r["bits_per_weight"] == r["bits"] + 0.25 for r in sizes if r["method"] == "rtn")
    out = tmp_path / "t.parquet"
    assert main(["query", "--results", store, "pareto", "--format", "parquet", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows > 0
    assert main(["query", "--results", store, "deltas", "--format", "json", "--out", str(tmp_path / "d.json")]) == 0
    assert {r["config"] for r in json.loads((tmp_path / "d.json").read_text())} >= {"rtn(sym:true) w4 g64"}
    assert main(["query", "--results", store, "anomalies", "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 1 + 3
    assert main(["query", "--results", store, "table1", "--format", "parquet"]) == 2
    capsys.readouterr()
    for sql in ("select * from read_csv('/etc/hostname')", "install httpfs", "load httpfs",
                "set enable_external_access = true", "copy cells to '/tmp/x.csv'"):
        assert main(["query", "--results", store, sql]) == 2, sql


def test_engine_agreement_flags_engines_that_disagree(tmp_path):
    rng = random.Random(3)
    nll = [3.0 + rng.gauss(0, 0.2) for _ in range(16)]

    noise = [rng.gauss(0, 0.01) for _ in nll]

    def engine_cell(cell_id, engine, shift, group_fallback="ragged", fallback=None):
        # each engine gets the same window noise in another order: differences of mean zero
        order = noise if engine == "gptqmodel" else noise[::-1]
        row = cell(cell_id, method="gptq", dataset="ppl", nll=[v + shift + e for v, e in zip(nll, order)])
        params = {"engine": engine, "group_fallback": group_fallback, "sym": True}
        return {**row, "method_params": json.dumps(params, sort_keys=True), "fallback": fallback}

    rows = [cell("b", method="baseline", dataset="ppl", nll=nll),
            engine_cell("a1", "gptqmodel", 0.10), engine_cell("b1", "llmcompressor", 0.10, "largest_divisor"),
            {**engine_cell("a2", "gptqmodel", 0.10), "bits": 3}, {**engine_cell("b2", "llmcompressor", 0.40), "bits": 3},
            # a fallback that was applied makes the configs different: not compared
            {**engine_cell("a3", "gptqmodel", 0.1, fallback="ragged"), "group_size": 128},
            {**engine_cell("b3", "llmcompressor", 0.1, "largest_divisor", fallback="largest_divisor"), "group_size": 128},
            # W8A8 (activations quantized) against weight-only int8: two schemes, not compared
            {**engine_cell("a4", "torchao", 0.0), "bits": 8, "group_size": -1},
            {**engine_cell("b4", "llmcompressor", 0.3), "bits": 8, "group_size": -1,
             "activation_quant": "int8 dynamic per token"}]
    Store(tmp_path).write_rows(rows)
    con = connect(str(tmp_path))
    got = {r[0]: r[1:] for r in con.execute(
        "select bits, group_size, engine_a, engine_b, stderr_kind, disagree from engine_agreement").fetchall()}
    assert set(got) == {3, 4}  # group 128 not paired
    assert got[4] == (64, "gptqmodel", "llmcompressor", "paired", False)
    assert got[3] == (64, "gptqmodel", "llmcompressor", "paired", True)


def test_no_change_at_low_bits_is_flagged(tmp_path):
    """SmolLM2's weights are dequantized Q4_1 (4 bits, blocks of 32, float offset): a 4-bit g32
    quantizer on that grid reproduces them (KL 0.0 with rtn zero_point float; 1.6e-4 with hqq,
    whose scales and zeros are fp16, in sweeps/methods.yaml).
    Such a cell is flagged, never shown as a lossless 4-bit config; 8 bits with KL ~0 is not."""
    nll = [2.0, 2.1, 2.2, 2.3]
    rows = [cell("b", method="baseline", dataset="ppl", nll=nll),
            {**cell("same4", group_size=32, dataset="ppl", nll=nll), "kl_divergence": 0.0},
            {**cell("hqq4", group_size=32, dataset="ppl", nll=nll), "kl_divergence": 1.6e-4},
            {**cell("hurt4", dataset="ppl", nll=[v + 0.1 for v in nll]), "kl_divergence": 0.3},
            {**cell("same8", bits=8, dataset="ppl", nll=nll), "kl_divergence": 0.0}]
    Store(tmp_path).write_rows(rows)
    flags = dict(connect(str(tmp_path)).execute(
        "select cell_id, anomaly from baseline_deltas where is_primary").fetchall())
    assert flags["same4"].startswith("no measurable change at <= 4 bits")
    assert flags["hqq4"].startswith("no measurable change at <= 4 bits")
    assert flags["hurt4"] is None and flags["same8"] is None


def test_baselines_pair_by_model_and_dataset_identity_not_by_name(tmp_path):
    """Two sweeps in one store, each with a model named 'llama': one an 8B, one a 70B. Each
    quantized cell pairs with its own model's baseline (across sweeps too), never the other's,
    and a cell of another seed has no baseline."""
    def at(row, sweep, path, seed=0):
        return {**row, "sweep": sweep, "model_path": path, "dataset_path": "/data/wiki.txt",
                "task": "perplexity", "seed": seed}

    rows = [
        at(cell("b8", method="baseline", dataset="wiki", model="llama", nll=[2.0, 2.1, 2.2, 2.3]), "s8", "/m/8b"),
        at(cell("q8", dataset="wiki", model="llama", nll=[2.1, 2.2, 2.3, 2.4]), "s8", "/m/8b"),
        at(cell("b70", method="baseline", dataset="wiki", model="llama", nll=[1.5, 1.6, 1.7, 1.8]), "s70", "/m/70b"),
        at(cell("q70", dataset="wiki", model="llama", nll=[1.6, 1.7, 1.8, 1.9]), "s70", "/m/70b"),
        # a later sweep of the 8B with another name for it, and a cell with another seed
        at(cell("q8-again", bits=3, dataset="wiki", model="llama-8b", nll=[2.5, 2.5, 2.5, 2.5]), "later", "/m/8b"),
        at(cell("q8-seed1", bits=3, group_size=32, dataset="wiki", model="llama", nll=[2.5] * 4), "s8", "/m/8b", seed=1),
    ]
    Store(tmp_path).write_rows(rows)
    pairs = dict(connect(str(tmp_path)).execute(
        "select cell_id, baseline_cell_id from baseline_deltas where metric = 'token_perplexity'").fetchall())
    assert pairs == {"q8": "b8", "q70": "b70", "q8-again": "b8"}


def test_memory_used_for_decisions_excludes_the_resident_base_model(tmp_path):
    """On CPU the actor's RSS holds the base model beside a quantized cell's: the figure pareto
    and recommend use is the cell's own."""
    rows = [cell("b", method="baseline", correct=[1] * 10),
            {**cell("q", correct=[1] * 10), "resident_base_bytes": BASE_BYTES}]
    rows[0]["resident_base_bytes"] = 0
    Store(tmp_path).write_rows(rows)
    got = connect(str(tmp_path)).execute(
        "select memory_bytes, memory_kind, baseline_memory_bytes from baseline_deltas").fetchall()
    assert got == [(BASE_BYTES, "peak_rss_bytes - resident_base_bytes", 2 * BASE_BYTES)]


def test_a_row_held_twice_counts_once_and_every_view_reads_the_same(store):
    """A compaction killed after writing its part but before deleting the sources leaves each
    row twice (the part and the cell's own file): the views see one row per cell and each
    paired test counts each example once, as on the clean store."""
    query = ("select cell_id, value, baseline_value, paired_n, p_value, delta_stderr from baseline_deltas "
             "order by cell_id, metric")
    before = repr(connect(store).execute(query).fetchall())  # repr: nan == nan
    tables = [connect(store).execute("select * from table1").fetchall(),
              connect(store).execute("select cell_id from pareto order by cell_id").fetchall()]
    results = Store(store)
    copy = results.root / "s" / "compacted" / "part-copy.parquet"
    copy.parent.mkdir(parents=True)
    pq.write_table(pq.ParquetDataset(results.files("s")).read(), copy)  # every row, again
    con = connect(store)
    assert con.execute("select count(*), count(distinct cell_id) from cells").fetchone() == (12, 12)
    assert repr(con.execute(query).fetchall()) == before
    assert [con.execute("select * from table1").fetchall(),
            con.execute("select cell_id from pareto order by cell_id").fetchall()] == tables
    assert dict(con.execute("select cell_id, paired_n from baseline_deltas").fetchall())["q4g64"] == 40


def test_a_query_reads_the_store_and_nothing_else(store, tmp_path, capsys):
    """Local stores are read by DuckDB's own Parquet reader, allowed exactly the store's files:
    those can be read (they are what the views read), nothing else, and qsweep query runs only
    queries, so no statement can write into the store either."""
    part = Store(store).files("s")[0]
    assert main(["query", "--results", store, f"select count(*) as n from read_parquet('{part}')"]) == 0
    assert "1" in capsys.readouterr().out
    target = tmp_path / "results" / "s" / "cells" / "x.parquet"
    for sql in (f"copy cells to '{target}'", f"copy (select 1) to '{part}'", "create table t as select 1",
                "select * from read_csv('/etc/hostname')", "pragma show_tables; select 1",
                f"select * from read_parquet('{tmp_path}/*.parquet')"):
        assert main(["query", "--results", store, sql]) == 2, sql
        assert "qsweep query:" in capsys.readouterr().err
    assert not target.exists() and connect(store).execute("select count(*) from cells").fetchone() == (12,)
    target.write_bytes(b"not parquet")  # a file something else wrote into the store
    assert main(["query", "--results", store, "select count(*) from cells"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the store" in err and "x.parquet" in err


def test_every_quantized_cell_has_its_config_label_bits_or_not(tmp_path):
    """Labels are built once per distinct configuration and joined back: a cell without bits or
    group size (a pruned model) keeps its label, and two cells of one configuration share it."""
    rows = [cell("b", method="baseline", correct=[1, 0, 1, 1]),
            {**cell("sp", method="sparsegpt", correct=[1, 0, 0, 1]), "bits": None, "group_size": None,
             "method_params": json.dumps({"sparsity": 0.5})},
            cell("r1", correct=[1, 1, 0, 1]), {**cell("r2", correct=[1, 0, 1, 0]), "dataset": "bq"}]
    Store(tmp_path / "results").write_rows(rows)
    labels = dict(connect(str(tmp_path / "results")).execute(
        "select cell_id, config from baseline_deltas").fetchall())
    assert labels == {"sp": "sparsegpt(sparsity:0.5)", "r1": "rtn(sym:true) w4 g64", "r2": "rtn(sym:true) w4 g64"}
