"""cluster/slurm/qsweep.sbatch on a real single-node SLURM (slurmctld + slurmd + munged from
Debian's slurm-wlm and munge, started here on ports of their own): Ray starts on the
allocation, the driver runs the sweep, the job's exit code is the driver's."""

from __future__ import annotations

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
SlurmdSpoolDir={state}/slurmd
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True, **kwargs)


@pytest.fixture(scope="module")
def slurm():
    """Environment (SLURM_CONF) of a one-node SLURM; every daemon is stopped afterwards."""
    state = Path(tempfile.mkdtemp(prefix="qss-", dir="/tmp"))
    state.chmod(0o755)  # munged runs as the munge user and must reach its directory
    munge_dir = state / "munge"
    munge_dir.mkdir()
    shutil.chown(munge_dir, "munge", "munge")
    host = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = free_ports(2)
    conf = state / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, ctld_port=ctld_port, slurmd_port=slurmd_port,
                                      state=state, cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid_files = [munge_dir / "munged.pid", state / "slurmctld.pid", state / "slurmd.pid"]
    try:
        run("runuser", "-u", "munge", "--", "munged", f"--socket={munge_dir}/munge.socket",
            "--key-file=/etc/munge/munge.key", f"--pid-file={munge_dir}/munged.pid",
            f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed")
        run("slurmctld", "-f", str(conf), env=env)
        wait_for_port(ctld_port, 30)
        run("slurmd", "-f", str(conf), env=env)
        deadline = time.monotonic() + 60
        while "idle" not in run("sinfo", "-h", "-o", "%t", env=env).stdout:
            if time.monotonic() > deadline:
                raise TimeoutError("the SLURM node never became idle: " + (state / "slurmd.log").read_text()[-2000:])
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


def sbatch(env: dict, workdir: Path, *args: str, **knobs: str) -> tuple[int, str]:
    """Submit the script, wait for it; (the job's exit code, its output)."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", **knobs}
    env.pop("RAY_ADDRESS", None)
    submitted = subprocess.run(["sbatch", "--parsable", "--wait", "--nodes=1", f"--chdir={workdir}",
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


def free_base() -> int:
    """The first of 8 consecutive free ports."""
    for _ in range(100):
        start = free_ports(1)[0]
        if start + 8 > 65535:
            continue
        try:
            sockets = []
            for port in range(start, start + 8):
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
