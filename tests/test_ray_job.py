"""`ray job submit --working-dir . -- qsweep run ...` against a real Ray head started here
(`ray start --head` on loopback, 2 logical GPUs, token authentication on), then the store."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster_util import free_ports, stop_group, wait_for_port, write_tiny_spec

from analysis.views import connect

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with token auth (its own token file, not ~/.ray/auth_token), its own ports and
    temp dir; yields (job server URL, environment with the token)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="qsr-", dir="/tmp"))  # short: Ray's socket paths
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    # Every port explicit: a shared machine (or CI) may run other Rays on the defaults.
    gcs, dashboard, client, node_manager, object_manager, agent_http, agent_grpc, metrics, \
        runtime_env_agent = free_ports(9)
    log = open(temp_dir / "ray-start.log", "wb")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(client), "--node-manager-port", str(node_manager),
         "--object-manager-port", str(object_manager), "--dashboard-agent-listen-port",
         str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port",
         str(metrics), "--runtime-env-agent-port", str(runtime_env_agent),
         "--num-cpus", "2", "--num-gpus", "2",
         "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_port(dashboard, 90, head)
        deadline = time.monotonic() + 90
        while True:  # the job server takes jobs once its agent has registered
            probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--no-wait",
                                    "--", "true"], env=env, capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray job server takes no job: {probe.stderr[-2000:]}")
            time.sleep(2)
        yield url, env
    finally:
        stop_group(head, grace_s=5)
        log.close()
        if head.returncode not in (0, -15, -9):
            print((temp_dir / "ray-start.log").read_text()[-3000:])
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(url: str, env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
         "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_job_submit_runs_the_sweep_and_resubmitting_is_safe(ray_head, tmp_path, tiny_llama, text_file):
    url, env = ray_head
    spec_path = tmp_path / "ray-job.yaml"
    write_tiny_spec(spec_path, "ray-job", tiny_llama, text_file, rtn={"sym": [True, False]})
    results = tmp_path / "results"  # a shared filesystem on a real cluster

    first = submit(url, env, "qsweep", "run", str(spec_path), "--results", str(results), "--no-progress")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "ran 3 cells" in first.stdout and "succeeded" in first.stdout + first.stderr

    rows = connect(str(results)).execute(
        "select method, status, actor, device from cells order by method").fetchall()
    assert [r[:2] for r in rows] == [("baseline", "ok"), ("rtn", "ok"), ("rtn", "ok")]
    assert len({r[2] for r in rows}) == 2  # one actor per logical GPU of the head (num_gpus=1)

    again = submit(url, env, "qsweep", "run", str(spec_path), "--results", str(results), "--no-progress")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "ran 0 cells" in again.stdout  # resume lives in the store


def test_job_submit_without_the_token_is_refused(ray_head):
    url, env = ray_head
    env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = "/nonexistent"  # no ~/.ray/auth_token to fall back on
    refused = submit(url, env, "true")
    assert refused.returncode != 0
    assert "Unauthorized" in refused.stderr or "authentication" in refused.stderr.lower()


def test_job_server_answers_http_only_with_the_token(ray_head):
    url, env = ray_head
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    assert err.value.code == 401
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(request, timeout=10).status == 200
