from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))

GOOD = {
    "name": "t",
    "models": [{"name": "m", "path": "/models/m"}],
    "methods": [{"name": "baseline"}, {"name": "rtn", "sym": [True, False]}],
    "bits": [3, 4],
    "group_sizes": [64, 128],
    "datasets": [{"name": "wiki", "task": "perplexity", "path": "/data/wiki.txt", "limit": 4}],
}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_shipped_sweep_validates(path):
    spec = load_spec(path)
    assert spec.models and spec.methods and spec.datasets


def test_shipped_sweeps_exist():
    assert any(p.name == "demo.yaml" for p in SWEEPS)


def test_every_problem_reported_at_once():
    bad = {
        "name": "bad name!",
        "colour": "blue",
        "models": [{"name": "unknown-model"}, {"name": "m", "path": "/m", "dtype": "float64"}],
        "methods": [{"name": "rnt"}, {"name": "rtn", "sym": "maybe", "speed": 3}],
        "bits": [4, 0],
        "group_sizes": [64, 0],
        "datasets": [{"name": "nowhere"}, {"name": "wiki", "task": "perplexity", "path": "x.txt",
                                           "seq_len": -5, "colour": 1}],
        "exclude": [{"flavour": "x"}],
    }
    with pytest.raises(SpecError) as info:
        parse_spec(bad, source="sweeps/bad.yaml")
    text = str(info.value)
    expected = [
        "sweeps/bad.yaml: name='bad name!'",
        "sweeps/bad.yaml: colour: unknown key; allowed: name, models",
        "models[0].path: 'unknown-model' is not a model qsweep knows (smollm2-135m)",
        "models[1].dtype='float64': allowed: float32, float16, bfloat16",
        "methods[0].name='rnt': unknown method 'rnt': did you mean 'rtn'? available: awq, baseline, fp8, gptq, gsq, hqq, int4, int8, magnitude, nf4, rtn, sparsegpt, wanda",
        "methods[1].speed: unknown parameter of 'rtn'; allowed: group_fallback, overrides, prune, sym, zero_point",
        "methods[1].sym='maybe'",
        "bits[1]=0: allowed: positive integers",
        "group_sizes[1]=0: allowed: positive integers or -1",
        "datasets[0].task='nowhere': unknown task 'nowhere'",
        "datasets[1].seq_len=-5",
        "datasets[1].colour: unknown key for task 'perplexity'",
        "exclude[0].flavour: unknown axis; allowed: model, method, bits, group_size, dataset",
    ]
    for fragment in expected:
        assert fragment in text, f"missing: {fragment}\n--- got:\n{text}"
    assert len(info.value.problems) >= len(expected)


def test_bits_no_method_supports_are_a_spec_error_others_skip():
    spec = dict(GOOD, bits=[1, 4])
    with pytest.raises(SpecError) as info:
        parse_spec(spec, source="s.yaml")
    assert "s.yaml: bits[0]=1: no method in the spec supports it ('rtn' supports {2, 3, 4, 5, 6, 7, 8}); remove it" in str(info.value)


def test_cells_outside_a_methods_reach_are_skipped_with_the_reason():
    from orchestrator.cells import expand
    from orchestrator.preflight import capability_verdict

    spec = parse_spec(dict(GOOD, bits=[4], group_sizes=[64, 128], group_fallback="pad",
                           overrides=[{"pattern": "lm_head", "bits": 8}]))
    rtn = [c for c in expand(spec) if c.method == "rtn"]
    assert {c.params["group_fallback"] for c in rtn} == {"pad"}
    assert rtn[0].params["overrides"] == ({"pattern": "lm_head", "bits": 8, "group_size": None, "keep": False},)
    widths = {"hidden_size": 576, "intermediate_size": 1536}
    g128 = next(c for c in rtn if c.group_size == 128)
    verdict = capability_verdict(g128, widths)
    assert not verdict.skip and "group_fallback pad" in verdict.note
    from tasks.quantize.registry import Capabilities

    caps = Capabilities(bits=frozenset({4, 8}), fallbacks=frozenset({"ragged"}), overrides=False)
    assert "cannot apply group_fallback=pad" in caps.unsupported(4, 128, "pad", {"hidden_size": 576}, False)
    assert caps.unsupported(4, 64, "pad", {}, False) is None
    assert caps.unsupported(3, 64, "pad", {}, False) == "supports bits {4, 8}, not 3"
    assert caps.unsupported(4, 64, "ragged", {}, True) == "cannot apply per-layer overrides"
    per_channel = Capabilities(bits=frozenset({8}), group_sizes=frozenset())
    assert per_channel.unsupported(8, 64, "ragged", {}, False) == (
        "takes one scale per output channel only (group_size -1), not group size 64")
    assert per_channel.unsupported(8, -1, "ragged", {}, False) is None


def test_bits_required_only_when_a_method_takes_them():
    spec = {k: v for k, v in GOOD.items() if k not in ("bits", "group_sizes")}
    parse_spec(dict(spec, methods=[{"name": "baseline"}]))
    with pytest.raises(SpecError, match="bits: missing"):
        parse_spec(spec)


def test_calibration_validated():
    with pytest.raises(SpecError, match=r"calibration.samples=0: must be a positive integer"):
        parse_spec(dict(GOOD, calibration={"dataset": "x", "samples": 0}))


def test_cli_plan_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    assert main(["plan", str(good), "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "sweep t: 9 cells in 9 quantization groups" in out  # 1 baseline + 2 sym x 2 bits x 2 groups
    assert "skipped by preflight" in out and "model directory /models/m does not exist" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(GOOD, bits=[99])))
    assert main(["plan", str(bad)]) == 2
    assert f"{bad}: bits[0]=99: no method in the spec supports it" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("name: [unclosed")
    assert main(["plan", str(not_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_cli_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_a_method_entry_may_set_its_own_bits_and_group_sizes():
    from orchestrator.cells import count_cells, expand

    spec = parse_spec(dict(GOOD, bits=[3, 4], group_sizes=[64, 128],
                           methods=[{"name": "baseline"}, {"name": "rtn"},
                                    {"name": "rtn", "sym": False, "bits": [8], "group_sizes": [-1]}]))
    cells = expand(spec)
    per_channel = [c for c in cells if c.params.get("sym") is False]
    assert {(c.bits, c.group_size) for c in per_channel} == {(8, -1)}
    assert {(c.bits, c.group_size) for c in cells if c.params.get("sym") is True} == {(3, 64), (3, 128), (4, 64), (4, 128)}
    assert count_cells(spec) == len(cells)
    with pytest.raises(SpecError) as info:
        parse_spec(dict(GOOD, methods=[{"name": "baseline", "bits": [4]}, {"name": "rtn", "group_sizes": [0]}]))
    assert "methods[0].bits=[4]: 'baseline' takes no bits; remove it" in str(info.value)
    assert "methods[1].group_sizes[0]=0: allowed: positive integers or -1" in str(info.value)
    # top-level axes are not required when every method that takes them sets its own
    spec = {k: v for k, v in GOOD.items() if k not in ("bits", "group_sizes")}
    parse_spec(dict(spec, methods=[{"name": "rtn", "bits": [4], "group_sizes": [32]}]))
