"""KL divergence against the baseline and the calibration-overlap flag, on the tiny Llama."""

from __future__ import annotations

import pytest

from tasks.evaluate.perplexity import TokenPerplexity
from tasks.evaluate.reference import BaselineLogprobs

PROFILE = {"prompt_len": 4, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0}


def _prepared(tiny_llama, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.spec import parse_spec

    spec = parse_spec({"name": "kl", "models": [{"name": "tiny", "path": str(tiny_llama)}],
                       "methods": [{"name": "baseline"}],
                       "datasets": [{"name": "t", "task": "perplexity", "path": str(text_file), "limit": 4,
                                     "seq_len": 32, "batch_size": 2}]})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    return model, tokenizer, TokenPerplexity().prepare(spec.datasets[0], tokenizer)


def test_kl_is_zero_against_itself_and_grows_as_bits_fall(tiny_llama, text_file):
    import copy

    from tasks.quantize.registry import RTNConfig
    from tasks.quantize.rtn import RTN

    model, tokenizer, data = _prepared(tiny_llama, text_file)
    reference = BaselineLogprobs(model)
    same = TokenPerplexity().evaluate(model, tokenizer, data, reference=reference)
    metrics = {m.metric: m.value for m in same.metrics}
    assert metrics["kl_divergence"] == pytest.approx(0.0, abs=2e-3)  # float16-held reference
    assert metrics["top1_agreement"] > 0.95  # a random tiny model has near-ties that float16 can flip
    assert reference.forward_passes == 2  # 4 windows in batches of 2
    kl = {}
    for bits in (2, 4, 8):
        quantized = copy.deepcopy(model)
        RTN().quantize(quantized, None, RTNConfig(sym=False), bits=bits, group_size=32)
        result = TokenPerplexity().evaluate(quantized, tokenizer, data, reference=reference)
        kl[bits] = next(m.value for m in result.metrics if m.metric == "kl_divergence")
        # exact KL from freshly computed float32 log-probs, same windows
        exact = TokenPerplexity().evaluate(quantized, tokenizer, data, reference=BaselineLogprobs(model, 0))
        assert kl[bits] == pytest.approx(next(m.value for m in exact.metrics if m.metric == "kl_divergence"),
                                         rel=0.02, abs=1e-4)
    assert reference.forward_passes == 2  # the baseline ran once per batch, for every cell
    assert kl[2] > kl[4] > kl[8] > 0


def test_sweep_rows_carry_kl_and_the_reference_runs_once(tiny_llama):
    from inline import run_inline

    from orchestrator.spec import parse_spec
    from tasks.worker import WorkerState

    spec = parse_spec({
        "name": "kl-sweep", "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [{"name": "baseline"}, {"name": "rtn", "sym": False}], "bits": [3, 8], "group_sizes": [32],
        "datasets": [{"name": "pydoc", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": 2,
                      "seq_len": 32}],
        "profile": PROFILE})
    state = WorkerState(threads=1)
    rows = {(cell.method, cell.bits): row for cell, row in run_inline(spec, state)}
    assert rows[("baseline", None)].get("kl_divergence") is None
    assert rows[("rtn", 3)]["kl_divergence"] > rows[("rtn", 8)]["kl_divergence"] > 0
    (reference,) = state._references.values()
    assert reference.forward_passes == 1  # 2 windows in one batch, computed for the first rtn cell only


def test_calibration_overlap_flags_evaluation_on_calibration_text(tiny_llama, text_file):
    from transformers import AutoTokenizer

    from tasks.calibration import calibration_overlap, load_calibration

    _, tokenizer, data = _prepared(tiny_llama, text_file)
    own = load_calibration({"dataset": str(text_file), "samples": 8, "seq_len": 64}, tokenizer)
    other = load_calibration({"dataset": "wikitext-fixture", "samples": 8, "seq_len": 64},
                             AutoTokenizer.from_pretrained(tiny_llama))
    assert calibration_overlap(own.input_ids, data) > 0.9
    assert calibration_overlap(other.input_ids, data) == 0.0
    assert calibration_overlap(own.input_ids, object()) is None  # not a token stream


def test_reference_runs_outside_every_cell_and_spills_to_disk(tiny_llama, monkeypatch, tmp_path):
    """The baseline's log-probs are computed before any cell's memory tracker or timer starts,
    once per dataset across groups, even with no memory budget for them (they go to disk)."""
    from inline import run_inline

    import tasks.worker as worker
    from orchestrator.spec import parse_spec
    from tasks.models import model_bytes

    monkeypatch.setenv("QSWEEP_REFERENCE_CACHE_MB", "0")  # every entry spills to the scratch disk
    monkeypatch.setenv("QSWEEP_SCRATCH", str(tmp_path / "scratch"))
    inside, violations, forwards = [False], [], []
    real_enter, real_exit = worker.MemoryTracker.__enter__, worker.MemoryTracker.__exit__
    real_forward = BaselineLogprobs._forward

    def enter(self):
        inside[0] = True
        return real_enter(self)

    def leave(self, *exc):
        inside[0] = False
        return real_exit(self, *exc)

    def forward(self, input_ids):
        forwards.append(len(input_ids))
        if inside[0]:
            violations.append(len(input_ids))
        return real_forward(self, input_ids)

    monkeypatch.setattr(worker.MemoryTracker, "__enter__", enter)
    monkeypatch.setattr(worker.MemoryTracker, "__exit__", leave)
    monkeypatch.setattr(BaselineLogprobs, "_forward", forward)
    spec = parse_spec({
        "name": "kl-outside", "models": [{"name": "tiny", "path": str(tiny_llama)}],
        "methods": [{"name": "baseline"}, {"name": "rtn", "sym": False}], "bits": [3, 4, 8], "group_sizes": [32],
        "datasets": [{"name": "pydoc", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": 4,
                      "seq_len": 32, "batch_size": 2},
                     {"name": "wiki", "task": "wikitext", "path": "builtin:wikitext", "limit": 2, "seq_len": 32,
                      "word_limit": 1}],
        "profile": PROFILE})
    state = worker.WorkerState(threads=1)
    rows = {(cell.method, cell.bits, cell.dataset.name): row for cell, row in run_inline(spec, state)}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error_message") for r in rows.values()]
    assert violations == []  # no reference forward inside a cell's tracker
    assert forwards == [2, 2, 2]  # pydoc: 4 windows in 2 batches; wiki: 2 windows in 1; once for 3 groups
    references = list(state._references.values())
    assert all(r.cached_bytes == 0 and r.disk_bytes > 0 and r.recomputed == 0 for r in references)
    assert rows[("rtn", 3, "pydoc")]["kl_divergence"] > rows[("rtn", 8, "pydoc")]["kl_divergence"] > 0
    # the base model the actor keeps beside a quantized cell is reported apart (CPU: in RSS)
    base_bytes = model_bytes(state._model)
    assert rows[("baseline", None, "pydoc")]["resident_base_bytes"] == 0
    assert rows[("rtn", 4, "wiki")]["resident_base_bytes"] == base_bytes > 0  # log-probs on disk here
