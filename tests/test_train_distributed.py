"""Multi-process runs of the whole job on the CPU (slow: a few DeepSpeed launches, ~2 minutes).

One small configuration is run three ways: 2 ZeRO-3 ranks, 1 rank with the
same global batch (gradient accumulation 2), and 2 ranks killed mid-stage-1
and rerun. All three must follow the same loss trajectory.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import REPO, base_env, check, free_port, losses, train_args

pytestmark = pytest.mark.slow


def launch(args, ranks: int, env_extra=None, check_rc=True):
    """`launch/train.py` on `ranks` CPU ranks (the deepspeed launcher), or as a plain process for one."""
    script = [str(REPO / "launch" / "train.py"), *args]
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), *script]
    proc = subprocess.run(cmd, env=base_env(**(env_extra or {})), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    if check_rc:
        check(proc, " ".join(cmd))
    return proc


# Stage 1 drops the Noise Aggregator for half the micro-batches (the default) and stage 2 replays stage-1 rows
# (helpers.SMALL): both choices must be the same whatever the rank count.


@pytest.fixture(scope="module")
def two_rank_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    launch(train_args(tiny_assets, out), ranks=2)
    return out


def test_two_ranks_match_one_rank_and_stay_orthogonal(tiny_assets, two_rank_run, tmp_path):
    # Reentrant gradient checkpointing on the 1-rank side: it must not change the math.
    launch(train_args(tiny_assets, tmp_path, **{"model.gradient_checkpointing": "true"}), ranks=1)
    for stage in ("stage1", "stage2"):
        a, b = losses(two_rank_run, stage), losses(tmp_path, stage)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert abs(x - y) <= 1e-4 * abs(y), (stage, a, b)
    # The validation loss, sharded over 2 ranks and gathered, equals 1 rank's.
    val = [json.loads((out / "stage1" / "result.json").read_text())["result"]["val_losses"]
           for out in (two_rank_run, tmp_path)]
    assert [s for s, _ in val[0]] == [s for s, _ in val[1]] == [5]
    assert abs(val[0][0][1] - val[1][0][1]) <= 1e-4 * val[1][0][1], val
    report = json.loads((two_rank_run / "report.json").read_text())
    assert report["orthogonality"]["mode"] == "hard"
    assert report["orthogonality"]["residual_max"] < 1e-5
    for key in ("train_loss_first", "train_loss_last"):
        assert report["stages"]["stage1"][key] is not None and report["stages"]["stage2"][key] is not None
    assert report["throughput"]["tokens_per_s"] > 0
    assert (Path(report["final_model_dir"]) / "model.safetensors").is_file()
    assert (two_rank_run / "report.md").is_file() and (two_rank_run / "loss.png").is_file()
    # Stage 2 trained on its rows plus half as many replayed stage-1 rows (SMALL: data.stage2_replay=0.5).
    s2 = report["stages"]["stage2"]
    assert s2["samples"] == s2["data"]["num_rows"] + round(0.5 * s2["data"]["num_rows"])
    # Every model along the pipeline scored against the base's own answers to the general prompts.
    assert list(report["pipeline"]) == ["base", "stage1", "taia", "final"]
    general = {k: v["general"] for k, v in report["pipeline"].items()}
    assert general["base"]["close_fraction"] == 1.0
    assert all(g["n"] == 24 and g["mean_token_loglik"] < 0 for g in general.values())
    assert (two_rank_run / "pipeline_eval.png").is_file() and "Every model along the pipeline" in \
        (two_rank_run / "report.md").read_text()


def test_killed_run_resumes_from_latest_complete_checkpoint(tiny_assets, two_rank_run, tmp_path):
    # SIGKILL on rank 1: the launcher ends rank 0 too, well before any collective timeout (1800 s).
    t0 = time.monotonic()
    crashed = launch(train_args(tiny_assets, tmp_path), ranks=2, env_extra={"MEDCARE_FAIL_AT": "stage1:3:1"},
                     check_rc=False)
    assert crashed.returncode != 0
    assert time.monotonic() - t0 < 300
    ckpts = tmp_path / "stage1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000002"
    assert not (tmp_path / "stage1" / "result.json").exists()
    launch(train_args(tiny_assets, tmp_path), ranks=2)
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


def test_crashes_across_the_stage_boundary_resume_to_the_same_adapters(tiny_assets, two_rank_run, tmp_path):
    # Rank 0 dies half-way through writing the merged model: nothing of it may be used.
    crashed = launch(train_args(tiny_assets, tmp_path), ranks=2, env_extra={"MEDCARE_FAIL_AT": "merge:0:0"},
                     check_rc=False)
    assert crashed.returncode != 0
    assert (tmp_path / "stage1" / "result.json").is_file()
    assert (tmp_path / ".merged_base.tmp" / "knowledge_adapters").is_dir()
    assert not (tmp_path / "merged_base").exists()
    # The rerun redoes the merge, then rank 1 dies after stage 2's first step, before any stage-2 checkpoint.
    crashed = launch(train_args(tiny_assets, tmp_path), ranks=2, env_extra={"MEDCARE_FAIL_AT": "stage2:1:1"},
                     check_rc=False)
    assert crashed.returncode != 0
    assert (tmp_path / "merged_base" / "config.json").is_file()
    assert not (tmp_path / "stage2" / "result.json").exists()
    launch(train_args(tiny_assets, tmp_path), ranks=2)
    assert losses(tmp_path, "stage2") == pytest.approx(losses(two_rank_run, "stage2"), rel=1e-6)
    for part in ("stage2/adapters/adapters.safetensors", "merged_base/model.safetensors"):
        want, got = load_file(str(two_rank_run / part)), load_file(str(tmp_path / part))
        assert want.keys() == got.keys()
        assert max(float((want[k].float() - got[k].float()).abs().max()) for k in want) < 1e-6, part
