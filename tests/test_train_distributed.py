"""Multi-process runs of the whole job on the CPU (slow: a few DeepSpeed launches, ~2 minutes).

One small configuration is run three ways: 2 ZeRO-3 ranks, 1 rank with the
same global batch (gradient accumulation 2), and 2 ranks killed mid-stage-1
and rerun. All three must follow the same loss trajectory.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Demo data, tokenizer and a briefly pretrained tiny base, built once for the module."""
    from medcare_dist.config import TinyModelConfig
    from medcare_dist.demo import prepare_demo
    from medcare_dist.demo_base import build_demo_base

    root = tmp_path_factory.mktemp("assets")
    demo = prepare_demo(root / "demo")
    tiny = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256)
    build_demo_base(root / "base", demo.tokenizer(), tiny, seed=0, steps=30)
    return {"base": root / "base", "stage1": demo.files["stage1_train"], "stage2": demo.files["stage2_train"]}


def overrides(assets, out: Path, **extra):
    kv = {
        "output_dir": str(out), "model.path": str(assets["base"]),
        "data.stage1": f"[{assets['stage1']}]", "data.stage2": f"[{assets['stage2']}]", "data.max_length": 96,
        "adapters.attn_dropout": 0.0, "adapters.router_aux_loss_coef": 0.01,
        "stage1.max_steps": 5, "stage2.max_steps": 3, "stage1.micro_batch_size": 4, "stage1.global_batch_size": 8,
        "stage2.micro_batch_size": 4, "stage2.global_batch_size": 8, "stage1.save_every": 2, "stage2.save_every": 0,
        "logging.tensorboard": False, "logging.progress_bar": False, "logging.log_every": 1,
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def launch(args, ranks: int, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if k != "MEDCARE_FAIL_AT"}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env_extra or {})})
    script = [str(REPO / "launch" / "train.py"), "--recipe", str(REPO / "launch" / "recipes" / "demo.yaml"), *args]
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), *script]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(out: Path, stage: str):
    return [v for _, v in json.loads((out / stage / "result.json").read_text())["result"]["losses"]]


@pytest.fixture(scope="module")
def two_rank_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    launch(overrides(assets, out), ranks=2)
    return out


def test_two_ranks_match_one_rank_and_stay_orthogonal(assets, two_rank_run, tmp_path):
    # Reentrant gradient checkpointing on the 1-rank side: it must not change the math.
    launch(overrides(assets, tmp_path, **{"model.gradient_checkpointing": "true"}), ranks=1)
    for stage in ("stage1", "stage2"):
        a, b = losses(two_rank_run, stage), losses(tmp_path, stage)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert abs(x - y) <= 1e-4 * abs(y), (stage, a, b)
    report = json.loads((two_rank_run / "report.json").read_text())
    assert report["orthogonality"]["mode"] == "hard"
    assert report["orthogonality"]["residual_max"] < 1e-5
    for key in ("train_loss_first", "train_loss_last"):
        assert report["stages"]["stage1"][key] is not None and report["stages"]["stage2"][key] is not None
    assert report["throughput"]["tokens_per_s"] > 0
    assert (Path(report["final_model_dir"]) / "model.safetensors").is_file()
    assert (two_rank_run / "report.md").is_file() and (two_rank_run / "loss.png").is_file()


def test_killed_run_resumes_from_latest_complete_checkpoint(assets, two_rank_run, tmp_path):
    crashed = launch(overrides(assets, tmp_path), ranks=2, env_extra={"MEDCARE_FAIL_AT": "stage1:3:1"}, check=False)
    assert crashed.returncode != 0
    ckpts = tmp_path / "stage1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000002"
    assert not (tmp_path / "stage1" / "result.json").exists()
    launch(overrides(assets, tmp_path), ranks=2)
    summary = json.loads((tmp_path / "stage1" / "result.json").read_text())["summary"]
    assert summary["resumed_from"].endswith("step-0000002")
    for stage in ("stage1", "stage2"):
        a, b = losses(two_rank_run, stage), losses(tmp_path, stage)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert abs(x - y) <= 1e-6 * abs(x), (stage, a, b)
    for stage in ("stage1", "stage2"):
        want = load_file(str(two_rank_run / stage / "adapters" / "adapters.safetensors"))
        got = load_file(str(tmp_path / stage / "adapters" / "adapters.safetensors"))
        assert want.keys() == got.keys()
        assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-6
