"""cluster/slurm/qsweep.sbatch on a real single-node SLURM (slurmctld + slurmd + munged from
Debian's slurm-wlm and munge, started here on ports of their own): Ray starts on the
allocation, the driver runs the sweep, the job's exit code is the driver's."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from cluster_util import free_ports, wait_for_port, write_tiny_spec

from analysis.views import connect

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "cluster" / "slurm" / "qsweep.sbatch"

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(shutil.which("slurmctld") is None or shutil.which("munged") is None,
                       reason="SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting slurmd and munged needs root"),
]

SLURM_CONF = """\
ClusterName=qsweeptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/slurmd-%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=10
{nodes}
PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True, **kwargs)


def start_slurm(n_nodes: int):
    """Environment (SLURM_CONF) and state folder of a SLURM of ``n_nodes`` nodes on this host:
    one slurmd (its own port) per node beyond the first, as slurmd's ``-N`` allows; every daemon
    is stopped afterwards."""
    state = Path(tempfile.mkdtemp(prefix="qss-", dir="/tmp"))
    state.chmod(0o755)  # munged runs as the munge user and must reach its directory
    munge_dir = state / "munge"
    munge_dir.mkdir()
    shutil.chown(munge_dir, "munge", "munge")
    host = socket.gethostname().split(".")[0]
    ctld_port, *slurmd_ports = free_ports(1 + n_nodes)
    if n_nodes == 1:
        names = [host]
        nodes = f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN"
    else:
        names = [f"qn{i}" for i in range(n_nodes)]
        nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 "
                          "State=UNKNOWN" for name, port in zip(names, slurmd_ports))
    conf = state / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, ctld_port=ctld_port, slurmd_port=slurmd_ports[0],
                                      state=state, nodes=nodes, names=",".join(names)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid_files = [munge_dir / "munged.pid", state / "slurmctld.pid"] + \
        [state / f"slurmd-{name}.pid" for name in names]
    try:
        run("runuser", "-u", "munge", "--", "munged", f"--socket={munge_dir}/munge.socket",
            "--key-file=/etc/munge/munge.key", f"--pid-file={munge_dir}/munged.pid",
            f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed")
        run("slurmctld", "-f", str(conf), env=env)
        wait_for_port(ctld_port, 30)
        for name in names:
            run("slurmd", "-f", str(conf), *(["-N", name] if n_nodes > 1 else []), env=env)
        deadline = time.monotonic() + 60
        while run("sinfo", "-h", "-N", "-o", "%t", env=env).stdout.split().count("idle") < n_nodes:
            if time.monotonic() > deadline:
                logs = "".join(p.read_text()[-1500:] for p in state.glob("slurmd-*.log"))
                raise TimeoutError(f"the SLURM node(s) never became idle: {logs}")
            time.sleep(1)
        yield env, state
    finally:
        for pid_file in reversed(pid_files):  # only the daemons this fixture started
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                try:
                    os.kill(pid, 15)
                    for _ in range(50):
                        os.kill(pid, 0)
                        time.sleep(0.2)
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM."""
    yield from start_slurm(1)


def sbatch(env: dict, workdir: Path, *args: str, nodes: int = 1, **knobs: str) -> tuple[int, str]:
    """Submit the script, wait for it; (the job's exit code, its output)."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", **knobs}
    env.pop("RAY_ADDRESS", None)
    submitted = subprocess.run(["sbatch", "--parsable", "--wait", f"--nodes={nodes}", f"--chdir={workdir}",
                                f"--output={workdir}/slurm-%j.out", str(SBATCH), *args],
                               env=env, capture_output=True, text=True, timeout=400)
    job_id = submitted.stdout.strip().split(";")[0]
    output = "\n".join(p.read_text() for p in workdir.glob(f"slurm-{job_id}.out"))
    return submitted.returncode, output + submitted.stderr


def test_sbatch_runs_the_sweep_and_exits_with_the_drivers_code(slurm, tmp_path, tiny_llama, text_file):
    env, _ = slurm
    spec_path = tmp_path / "on-slurm.yaml"
    write_tiny_spec(spec_path, "on-slurm", tiny_llama, text_file)
    results = tmp_path / "results"
    port = free_ports(1)[0]
    knobs = {"QSWEEP_VENV": str(ROOT / ".venv"), "QSWEEP_GPUS_PER_NODE": "2",  # logical GPUs
             "QSWEEP_RAY_PORT": str(port), "QSWEEP_RAY_PORT_BASE": str(free_base()),
             "PYTHONPATH": str(ROOT)}

    rc, output = sbatch(env, tmp_path, str(spec_path), "--results", str(results), "--no-progress", **knobs)
    assert rc == 0, output[-5000:]
    assert "ran 2 cells" in output and "driver exited with 0" in output
    rows = connect(str(results)).execute("select method, status, actor from cells order by method").fetchall()
    assert [r[:2] for r in rows] == [("baseline", "ok"), ("rtn", "ok")]
    assert len({r[2] for r in rows}) == 2  # one actor per (logical) GPU of the allocation

    # A spec error: the driver exits 2, and so does the job.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(spec_path.read_text()), "bits": [12]}))
    knobs["QSWEEP_RAY_PORT"], knobs["QSWEEP_RAY_PORT_BASE"] = str(free_ports(1)[0]), str(free_base())
    rc, output = sbatch(env, tmp_path, str(bad), "--results", str(results), **knobs)
    assert rc == 2 and "invalid spec" in output, output[-5000:]


def free_base(count: int = 8) -> int:
    """The first of ``count`` consecutive free ports."""
    for _ in range(100):
        start = free_ports(1)[0]
        if start + count > 65535:
            continue
        try:
            sockets = []
            for port in range(start, start + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("0.0.0.0", port))
            return start
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no 8 consecutive free ports")


def test_sbatch_on_two_nodes(tmp_path, tiny_llama, text_file):
    """Two SLURM nodes on this host (a slurmd each, ``slurmd -N``): Ray's head on the first, a
    worker on the second (further ports offset by QSWEEP_RAY_PORT_STRIDE, as they share a host),
    one logical GPU each: both nodes' GPUs get an actor and the job's code is the driver's."""
    with contextlib.contextmanager(start_slurm)(2) as (env, _):
        spec_path = tmp_path / "two-nodes.yaml"
        write_tiny_spec(spec_path, "two-nodes", tiny_llama, text_file)
        results = tmp_path / "results"
        knobs = {"QSWEEP_VENV": str(ROOT / ".venv"), "QSWEEP_GPUS_PER_NODE": "1", "QSWEEP_CPUS_PER_NODE": "1",
                 "QSWEEP_RAY_PORT": str(free_ports(1)[0]), "QSWEEP_RAY_PORT_BASE": str(free_base(16)),
                 "QSWEEP_RAY_PORT_STRIDE": "8", "PYTHONPATH": str(ROOT)}
        rc, output = sbatch(env, tmp_path, str(spec_path), "--results", str(results), "--no-progress",
                            nodes=2, **knobs)
        assert rc == 0, output[-5000:]
        assert "2 node(s) qn0 qn1" in output and "driver exited with 0" in output
        rows = connect(str(results)).execute("select method, status, actor, actor_gpus from cells "
                                             "order by method").fetchall()
        assert [r[:2] for r in rows] == [("baseline", "ok"), ("rtn", "ok")]
        assert len({r[2] for r in rows}) == 2 and {r[3] for r in rows} == {1}  # an actor per node's GPU
