"""A real SLURM (Debian's slurm-wlm + munge) as a one-node cluster: train.sbatch to completion, and
train_requeue.sbatch through a SIGUSR1 requeue and an admin's `scontrol requeue`, ending equal to an
uninterrupted run. Skipped, saying why, where SLURM is not installed and apt cannot install it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import REPO, base_env, free_port, train_args

pytestmark = pytest.mark.slow
PY = sys.executable
STEPS = 120  # ~0.2 s each on 2 CPU ranks: long enough for two interruptions mid-stage


def _install_slurm() -> str | None:
    """None when slurmctld, slurmd and munged are there (installed now if need be); else why not."""
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in ("slurmctld", "slurmd", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get as root is not available to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out (apt unreachable?)"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed (apt unreachable?): {proc.stderr.strip()[-300:]}"
    return None


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _install_slurm()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=medcaretest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ReturnToService=2
JobRequeue=1
KillWait=60
NodeName={host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True, timeout=30)
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([f"/usr/sbin/{daemon}", "-f", str(conf)], env=env, check=True, timeout=30)
    try:
        _wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                               text=True).stdout, 60, "the node to become idle")
        yield {"env": env, "root": root}
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for daemon in ("slurmd", "slurmctld"):
            pid = root / f"{daemon}.pid"
            if pid.is_file():
                try:
                    os.kill(int(pid.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def _cpu_script(name: str, root: Path) -> Path:
    """The sbatch script as shipped, minus its GPU and exclusivity requests (this node has no GPU)."""
    text = (REPO / "launch" / "slurm" / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith(("#SBATCH --gpus-per-node", "#SBATCH --exclusive"))]
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _job_env(slurm, tmp_path, **extra) -> dict:
    env = base_env(SLURM_CONF=slurm["env"]["SLURM_CONF"], MEDCARE_PYTHON=PY, MEDCARE_GPUS_PER_NODE=2,
                   MEDCARE_MASTER_ADDR="127.0.0.1", MEDCARE_RUN_DIR=tmp_path / "slurm-run", OMP_NUM_THREADS=1,
                   **extra)
    env["PATH"] = os.environ["PATH"]
    return env


def _squeue_state(job: str, env) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return f"{fields.get('JobState', '?')} restarts={fields.get('Restarts', '?')}"


def _adapters(out: Path) -> dict:
    return load_file(str(out / "stage1" / "adapters" / "adapters.safetensors"))


def test_train_sbatch_runs_the_pipeline_to_completion(slurm, tiny_assets, tmp_path):
    out = tmp_path / "out"
    script = _cpu_script("train.sbatch", tmp_path)
    log = tmp_path / "job.log"
    proc = subprocess.run(["sbatch", "--wait", "--nodes=1", f"--output={log}", str(script),
                           *train_args(tiny_assets, out)], env=_job_env(slurm, tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stderr, log.read_text()[-4000:] if log.exists() else "")
    assert (out / "final" / "MANIFEST.sha256.json").is_file() and (out / "report.md").is_file()
    assert "training exited with status 0" in log.read_text()


def test_requeue_sbatch_survives_a_sigusr1_requeue_and_an_admin_requeue(slurm, tiny_assets, tmp_path):
    overrides = {"stage": 1, "stage1.max_steps": STEPS, "stage1.save_every": 0}
    whole = tmp_path / "whole"
    proc = subprocess.run([PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(free_port()), "launch/train.py", *train_args(tiny_assets, whole, **overrides)],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    log = tmp_path / "job.log"
    script = _cpu_script("train_requeue.sbatch", tmp_path)
    env = _job_env(slurm, tmp_path, MASTER_PORT=free_port())
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--output={log}", str(script),
                           *train_args(tiny_assets, out, **overrides)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    train_log = out / "train.log"

    def logged(text):
        return train_log.is_file() and text in train_log.read_text()

    _wait(lambda: logged("stage1 step 3/"), 300, "the first run's third step")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)   # --signal=B:USR1@...
    _wait(lambda: logged("resumed from"), 300, "the requeued run's resume")
    steps_then = train_log.read_text().count("stage1 step ")
    _wait(lambda: train_log.read_text().count("stage1 step ") >= steps_then + 2, 120, "steps of the second run")
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)                  # the admin's requeue
    _wait(lambda: (out / "stage1" / "result.json").is_file() and "COMPLETED" in _squeue_state(job, env), 600,
          f"job {job} to complete ({_squeue_state(job, env)})")
    text = log.read_text()
    assert "requeueing job" in text                           # the SIGUSR1 round: checkpoint, exit 75, requeue
    # the admin's round: SIGTERM to every process of the job; the launchers die of it, the ranks checkpoint
    assert "after the ranks wrote a checkpoint and exited 75" in text, text[-4000:]
    assert text.count("training exited with status 75") == 2, text[-4000:]
    assert text.count(f"job {job} (restart") >= 3, text[-4000:]  # one log, appended across the requeues
    resumed = [ln for ln in train_log.read_text().splitlines() if "resumed from" in ln]
    assert len(resumed) >= 2, resumed
    record = json.loads((out / "stage1" / "result.json").read_text())
    assert record["summary"]["resumed_from"]
    want, got = _adapters(whole), _adapters(out)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-6
