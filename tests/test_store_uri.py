"""Results on an object store: an S3-compatible server (moto) started here, and fsspec's memory
filesystem. Per-cell writes, compaction, resume and DuckDB queries over the same URI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
from cluster_util import write_tiny_spec
from test_store import row

from analysis.views import connect
from orchestrator.store import Store, StoreError

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """``host:port`` of a moto S3 server holding an empty bucket ``results``."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.2)
        endpoint = f"127.0.0.1:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing",
                          secret_key="testing", region="us-east-1",
                          allow_bucket_creation=True).create_dir("results")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)


def s3_uri(endpoint: str, prefix: str) -> str:
    return f"s3://results/{prefix}?endpoint_override={endpoint}&scheme=http"


def test_s3_writes_compacts_and_queries(s3_endpoint, aws_env):
    uri = s3_uri(s3_endpoint, "unit")
    store = Store(uri)
    assert store.root == "s3://results/unit"  # the query (which may hold secrets) is not shown
    store.check_writable("s")
    store.write_rows([row(f"c{i}", minutes=i) for i in range(6) if i != 3])
    store.write_rows([row("c3", status="failed", minutes=1)])
    store.write_rows([row("c3", status="failed", minutes=100, value=2.0)])  # replaces c3's object
    assert len(store.files("s")) == 6 and all(f.startswith("results/unit/s/cells/") for f in store.files())
    assert connect(uri).execute("select status, primary_value from cells where cell_id='c3'").fetchone() == (
        "failed", 2.0)

    assert store.compact("s") == (6, 1)
    assert [f.split("/")[-2] for f in store.files("s")] == ["compacted"]
    store.write_rows([row("c3", status="ok", minutes=200), row("c9", minutes=200)])
    con = connect(uri)
    assert con.execute("select count(*) from cells").fetchone() == (7,)
    assert con.execute("select status from cells where cell_id='c3'").fetchone() == ("ok",)
    assert store.compact("s") == (3, 1)
    assert Store(uri).read("s").num_rows == 7


def test_s3_compaction_killed_between_put_and_deletes_doubles_nothing(s3_endpoint, aws_env):
    monkeypatch = pytest.MonkeyPatch()  # its own, so that undo() leaves aws_env's variables
    uri = s3_uri(s3_endpoint, "killed")
    store = Store(uri)
    store.write_rows([row(f"c{i}", minutes=i) for i in range(4)])

    def killed(self, path):
        raise KeyboardInterrupt("killed between the part's PUT and the deletes")

    monkeypatch.setattr(Store, "_delete", killed)
    with pytest.raises(KeyboardInterrupt):
        store.compact("s")
    monkeypatch.undo()
    assert len(store.files("s")) == 5  # four cells and the part, for a moment ...
    assert connect(uri).execute("select count(*) from cells").fetchone() == (4,)  # ... read once
    # the cells' rows are in the part already: their files go, no part is written or rewritten
    assert store.compact("s") == (4, 0) and Store(uri).read("s").num_rows == 4
    assert len(store.files("s")) == 1


def test_unwritable_bucket_fails_fast(s3_endpoint, aws_env):
    with pytest.raises(StoreError, match="not writable.*endpoint_override"):
        Store(f"s3://no-such-bucket/x?endpoint_override={s3_endpoint}&scheme=http").check_writable("s")


def test_fsspec_filesystem(tmp_path):
    pytest.importorskip("fsspec")
    uri = f"memory://qsweep-test-{os.getpid()}/results"
    store = Store(uri)
    store.check_writable("s")
    store.write_rows([row("a", status="failed", minutes=0), row("b", minutes=1)])
    store.write_rows([row("a", status="failed", minutes=2, value=2.0)])  # replaces a's failed row
    store.write_rows([row("b", status="failed", minutes=3)])  # never replaces b's ok row
    assert store.compact("s") == (3, 1)
    assert connect(uri).execute("select cell_id, status, primary_value from cells order by 1").fetchall() == [
        ("a", "failed", 2.0), ("b", "ok", 1.0)]


def test_unknown_scheme_is_a_usage_error():
    with pytest.raises(StoreError, match="nosuch://"):
        Store("nosuch://bucket/results")


def test_sweep_results_on_s3_then_queried(tmp_path, s3_endpoint, tiny_llama, text_file):
    """A real sweep (embedded Ray) whose only store is the S3 server; resume and SQL read it."""
    spec_path = tmp_path / "on-s3.yaml"
    write_tiny_spec(spec_path, "on-s3", tiny_llama, text_file)
    uri = "s3://results/sweeps"  # the endpoint comes from AWS_ENDPOINT_URL this time
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{s3_endpoint}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)

    def qsweep(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    first = qsweep("run", str(spec_path), "--results", uri, "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ran 2 cells" in first.stdout and "results: s3://results/sweeps/on-s3/cells" in first.stdout
    assert not list(tmp_path.glob("**/*.parquet"))  # nothing landed on the local disk

    again = qsweep("run", str(spec_path), "--results", uri, "--no-progress")
    assert again.returncode == 0 and "ran 0 cells" in again.stdout  # resume reads the bucket

    query = qsweep("query", "--results", uri, "--format", "csv",
                   "select method, status, primary_metric from cells order by method")
    assert query.returncode == 0, query.stderr[-3000:]
    assert query.stdout.splitlines() == ["method,status,primary_metric", "baseline,ok,token_perplexity",
                                         "rtn,ok,token_perplexity"]
    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    keys = sorted(i.path for i in s3.get_file_info(pafs.FileSelector("results/sweeps", recursive=True))
                  if i.type == pafs.FileType.File)
    assert len(keys) == 2 and keys[0].startswith("results/sweeps/on-s3/compacted/part-")
    # the second run took the next generation of the sweep's lease (a conditional PUT) and
    # released it; the first run's lease object was pruned
    assert keys[1] == "results/sweeps/on-s3/leases/lease-000000000002.json"
    with s3.open_input_stream(keys[1]) as f:
        assert json.loads(f.read())["released"] is True
