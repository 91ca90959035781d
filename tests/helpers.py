"""Helpers shared by the multi-process tests: ports, a clean environment, the small run configuration."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "launch" / "recipes" / "demo.yaml"

# A few optimizer steps of each stage on the tiny base of the `tiny_assets` fixture (tests/conftest.py).
SMALL = {
    "data.max_length": 96, "adapters.attn_dropout": 0.0, "adapters.router_aux_loss_coef": 0.01,
    "stage1.max_steps": 5, "stage2.max_steps": 3, "stage1.micro_batch_size": 4, "stage1.global_batch_size": 8,
    "stage2.micro_batch_size": 4, "stage2.global_batch_size": 8, "stage1.save_every": 2, "stage2.save_every": 0,
    "logging.report_to": "[]", "logging.progress_bar": False, "logging.log_every": 1,
    "data.stage2_replay": 0.5,  # stage 2 replays stage-1 rows (the demo recipe's 1.0 would double its rows)
    "data.val_size": 0.05, "stage1.eval_every": 5,  # stage 1 holds out 5 % of its rows, validated at its end
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    """This environment without launcher, scheduler or failure-injection variables; CPU DeepSpeed.

    HOME and the rest are kept: DeepSpeed's JIT-built CPU ops are cached under it.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MEDCARE_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_args(assets, out, **extra) -> list[str]:
    """`launch/train.py` arguments: the demo recipe on the tiny assets with SMALL and `extra` overrides."""
    kv = {"output_dir": out, "model.path": assets["base"], "data.stage1": f"[{assets['stage1']}]",
          "data.stage2": f"[{assets['stage2']}]", **SMALL, **extra}
    return ["--recipe", str(RECIPE), *[f"{k}={v}" for k, v in kv.items()]]


def run_train(assets, out, env=None, **overrides):
    """`python launch/train.py` (one process) on the tiny assets with SMALL and `overrides`."""
    return subprocess.run([sys.executable, "launch/train.py", *train_args(assets, out, **overrides)],
                          env=base_env(**(env or {})), cwd=REPO, capture_output=True, text=True, timeout=600)


def losses(out: Path, stage: str) -> list[float]:
    return [v for _, v in json.loads((Path(out) / stage / "result.json").read_text())["result"]["losses"]]


def check(proc, what: str):
    if proc.returncode != 0:
        raise AssertionError(f"{what} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def start_two_node_launchers(tmp_path: Path, args, env, cwds=(REPO, REPO), **popen) -> list:
    """One deepspeed launcher per simulated node (--no_ssh, node ranks 0 and 1, one rank each, loopback),
    as srun starts them; `args` go to launch/train.py. Returns the two Popen objects (text pipes)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never resolves them
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                              "--no_ssh", "--node_rank", str(node), "--num_nodes", "2", "--num_gpus", "1",
                              "--master_addr", "127.0.0.1", "--master_port", str(port),
                              str(REPO / "launch" / "train.py"), *args],
                             env=env, cwd=cwds[node], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             **popen)
            for node in (0, 1)]
