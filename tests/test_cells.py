from __future__ import annotations

import copy
import hashlib
import json

import pytest

from orchestrator.cells import expand, group_cells
from orchestrator.spec import SpecError, parse_spec

BASE = {
    "name": "t",
    "models": [{"name": "m", "path": "/models/m", "dtype": "float32"}],
    "methods": [{"name": "baseline"}, {"name": "rtn", "sym": [True, False]}],
    "bits": [3, 4],
    "group_sizes": [64, 128],
    "datasets": [{"name": "a", "task": "perplexity", "path": "/d/a.txt", "limit": 4},
                 {"name": "b", "task": "perplexity", "path": "/d/b.txt", "seq_len": 256}],
}


def ids(raw):
    return [c.cell_id for c in expand(parse_spec(raw))]


def test_cell_id_is_stable():
    # Golden value: changing it silently would re-run every stored study. Bump IDENTITY_VERSION
    # (and this value) only on purpose.
    cells = expand(parse_spec(BASE))
    baseline = next(c for c in cells if c.method == "baseline" and c.dataset.name == "a")
    identity = {
        "model": {"name": "m", "path": "/models/m", "dtype": "float32"},
        "method": "baseline", "params": {}, "bits": None, "group_size": None,
        "calibration": None, "seed": 0,
        "dataset": {"name": "a", "task": "perplexity", "path": "/d/a.txt", "limit": 4,
                    "settings": {"seq_len": 2048, "stride": None, "batch_size": 4,
                                 "text_field": "text", "split": "test"}},
        "schema_version": 1,
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    assert baseline.cell_id == hashlib.sha256(text.encode()).hexdigest()[:24]


def test_cell_id_independent_of_key_order():
    reordered = {k: BASE[k] for k in reversed(list(BASE))}
    reordered = copy.deepcopy(reordered)
    reordered["models"] = [{"dtype": "float32", "path": "/models/m", "name": "m"}]
    reordered["datasets"] = [dict(reversed(list(d.items()))) for d in BASE["datasets"]]
    reordered["methods"] = [{"name": "baseline"}, {"sym": [True, False], "name": "rtn"}]
    assert sorted(ids(reordered)) == sorted(ids(BASE))


def test_defaults_spelled_out_give_the_same_cell():
    explicit = copy.deepcopy(BASE)
    explicit["methods"][1] = {"name": "rtn", "sym": [True, False], "zero_point": "int", "group_fallback": "ragged"}
    assert sorted(ids(explicit)) == sorted(ids(BASE))


def test_expansion_honours_method_axes():
    cells = expand(parse_spec(BASE))
    baseline = [c for c in cells if c.method == "baseline"]
    rtn = [c for c in cells if c.method == "rtn"]
    assert len(baseline) == 2  # per dataset; no bits or group-size axis
    assert all(c.bits is None and c.group_size is None for c in baseline)
    assert len(rtn) == 2 * 2 * 2 * 2  # sym x bits x group_sizes x datasets
    groups = group_cells(cells)
    assert len(groups) == 1 + 8 and all(len(g.cells) == 2 for g in groups)


def test_irrelevant_parameter_collapses():
    raw = copy.deepcopy(BASE)
    raw["methods"][1] = {"name": "rtn", "sym": [True, False], "zero_point": ["int", "float"]}
    rtn = [c for c in expand(parse_spec(raw)) if c.method == "rtn"]
    variants = {tuple(sorted(c.params.items())) for c in rtn}
    assert len(variants) == 3  # sym; asym+int; asym+float (zero_point means nothing when sym)


def test_excludes():
    raw = dict(BASE, exclude=[{"method": "rtn", "bits": 3, "group_size": 128},
                              {"dataset": "b", "sym": False}])
    cells = expand(parse_spec(raw))
    assert not any(c.method == "rtn" and c.bits == 3 and c.group_size == 128 for c in cells)
    assert not any(c.dataset.name == "b" and c.params.get("sym") is False for c in cells)
    assert len(cells) == 18 - 4 - 3  # 4 with b3g128; 3 more asym on b outside that rule


def test_adding_an_axis_value_keeps_existing_ids():
    before = set(ids(BASE))
    after = set(ids(dict(BASE, group_sizes=[64, 128, 32])))
    assert before < after and len(after - before) == 2 * 2 * 2  # sym x bits x datasets at g32


def test_calibration_only_in_methods_that_need_it():
    with_calibration = dict(BASE, calibration={"dataset": "x", "samples": 8, "seq_len": 64})
    assert sorted(ids(with_calibration)) == sorted(ids(BASE))  # rtn and baseline take none


def test_an_engine_that_calibrates_carries_the_calibration():
    """int8 is calibration-free through torchao, but llm-compressor's W8A8 runs SmoothQuant on
    calibration activations: its cells carry the spec's calibration (so its rows record it), the
    torchao cells do not, and a spec without calibration is refused for it alone."""
    raw = dict(BASE, methods=[{"name": "int8", "engine": ["torchao", "llmcompressor"]}],
               bits=[8], group_sizes=[-1], calibration={"dataset": "x", "samples": 8, "seq_len": 64})
    cells = {c.params["engine"]: c for c in expand(parse_spec(raw)) if c.dataset.name == "a"}
    assert cells["llmcompressor"].calibration == {"dataset": "x", "samples": 8, "seq_len": 64}
    assert cells["torchao"].calibration is None
    torchao_only = dict(raw, methods=[{"name": "int8", "engine": "torchao"}])
    del torchao_only["calibration"]
    assert len(expand(parse_spec(torchao_only))) == 2
    without = {k: v for k, v in raw.items() if k != "calibration"}
    with pytest.raises(SpecError, match=r"calibration.*int8"):
        parse_spec(without)
