"""Numerical faults and dead ranks, on real runs broken by the injection switches of medcare_dist.training.faults.

Fast (one process, a few seconds each): steps with a NaN gradient are discarded, leaving optimizer
and scheduler exactly as before them; too many in a row save a checkpoint and stop, and the rerun
resumes from it; a checkpoint killed between writing and publishing is never loaded. Slow (2 ZeRO-3 ranks): a NaN on one rank only is discarded by both; a rank lost on
another node fails the job at once if it was killed, within the collective timeout if it froze.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, RECIPE, base_env, check, free_port, losses, start_two_node_launchers, train_args
from helpers import run_train as run

from medcare_dist.training.checkpoint import safe_load
from medcare_dist.config import load_config
from medcare_dist.training.trainer import lr_lambda
from medcare_dist.training.integrity import write_manifest


def optimizer_state(out: Path, step: int, rank: int = 0) -> dict:
    """The tensors of one rank's ZeRO optimizer partition: fp32 master weights, Adam moments and step."""
    path = out / "stage1" / "checkpoints" / f"step-{step:07d}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    sd = safe_load(path)["optimizer_state_dict"]
    tensors = {f"fp32/{i}": t for i, t in enumerate(sd["fp32_flat_groups"])}
    for pid, state in sd["optimizer_state_dict"]["state"].items():
        tensors.update({f"{pid}/{k}": torch.as_tensor(v) for k, v in state.items()})
    return tensors


def same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def result(out: Path, stage: str = "stage1") -> dict:
    return json.loads((out / stage / "result.json").read_text())


def test_steps_with_a_nonfinite_gradient_leave_no_trace(tiny_assets, tmp_path):
    # Steps 2 and 3: finite loss, NaN gradient (an overflow in backward).
    overrides = {"stage": 1, "stage1.save_every": 1, "logging.keep_last": 10}
    proc = run(tiny_assets, tmp_path, {"MEDCARE_NONFINITE_AT": "stage1:2-3:0:grad"}, **overrides)
    check(proc, "training with NaN gradients at steps 2-3")
    assert "stage1 step 2/5: non-finite gradient" in proc.stderr
    res = result(tmp_path)["result"]
    assert res["skipped_steps"] == [[2, "non-finite gradient"], [3, "non-finite gradient"]]
    assert [s for s, _ in res["losses"]] == [1, 4, 5]
    assert all(math.isfinite(v) for _, v in res["losses"])
    # Master weights, Adam moments and Adam's step count after step 3 are those after step 1, bit for bit.
    assert same(optimizer_state(tmp_path, 1), optimizer_state(tmp_path, 3))
    assert not same(optimizer_state(tmp_path, 3), optimizer_state(tmp_path, 4))
    # The scheduler did not advance either: after step 4 it has taken two steps.
    cfg = load_config(str(RECIPE), train_args(tiny_assets, tmp_path, **overrides)[2:])
    f = lr_lambda(cfg.stage1.lr_scheduler, math.ceil(cfg.stage1.warmup_ratio * 5), 5)
    lr_after_4 = dict(res["lrs"])[4]
    assert lr_after_4 == pytest.approx(cfg.stage1.lr * f(2), rel=1e-6)
    assert lr_after_4 != pytest.approx(cfg.stage1.lr * f(4), rel=1e-3)
    assert result(tmp_path)["summary"]["skipped_steps"] == 2


def test_too_many_nonfinite_steps_in_a_row_save_and_stop_then_resume(tiny_assets, tmp_path):
    overrides = {"stage": 1, "stage1.save_every": 0, "fault_tolerance.max_nonfinite_steps": 2}
    proc = run(tiny_assets, tmp_path, {"MEDCARE_NONFINITE_AT": "stage1:2-5"}, **overrides)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 optimizer steps in a row (2..4) had a non-finite loss" in proc.stderr
    assert "fault_tolerance.max_nonfinite_steps=2" in proc.stderr
    ckpts = tmp_path / "stage1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000004"
    assert not (tmp_path / "stage1" / "result.json").exists()

    check(run(tiny_assets, tmp_path, **overrides), "the rerun without NaNs")
    record = result(tmp_path)
    assert record["summary"]["resumed_from"].endswith("step-0000004")
    assert record["result"]["skipped_steps"] == [[s, "non-finite loss"] for s in (2, 3, 4)]
    assert [s for s, _ in record["result"]["losses"]] == [1, 5]


def test_a_checkpoint_cut_off_before_publishing_is_never_loaded(tiny_assets, tmp_path):
    overrides = {"stage": 1, "stage1.save_every": 1, "logging.keep_last": 10}
    check(run(tiny_assets, tmp_path / "whole", **overrides), "uninterrupted run")
    out = tmp_path / "cut"
    proc = run(tiny_assets, out, {"MEDCARE_FAIL_AT": "checkpoint:3"}, **overrides)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = out / "stage1" / "checkpoints"
    assert (ckpts / ".tmp-step-0000003" / "rng_rank0.safetensors").is_file()   # fully written, not published
    assert (ckpts / "latest").read_text().strip() == "step-0000002"
    check(run(tiny_assets, out, **overrides), "the rerun")
    assert result(out)["summary"]["resumed_from"].endswith("step-0000002")
    assert not (ckpts / ".tmp-step-0000003").exists()
    assert losses(out, "stage1") == pytest.approx(losses(tmp_path / "whole", "stage1"), rel=1e-6)
    want = load_file(str(tmp_path / "whole" / "stage1" / "adapters" / "adapters.safetensors"))
    got = load_file(str(out / "stage1" / "adapters" / "adapters.safetensors"))
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-6


@pytest.mark.slow
def test_a_nan_on_one_rank_is_discarded_by_every_rank(tiny_assets, tmp_path):
    overrides = {"stage": 1, "stage1.save_every": 1, "logging.keep_last": 10}
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(port), "launch/train.py", *train_args(tiny_assets, tmp_path, **overrides)],
                          env=base_env(MEDCARE_NONFINITE_AT="stage1:2:1"), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    check(proc, "2 ranks, NaN loss on rank 1 at step 2")
    # DeepSpeed's CPU all-reduce buffers (67 MB of RAM each) are not left behind in /dev/shm.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert result(tmp_path)["result"]["skipped_steps"] == [[2, "non-finite loss"]]
    for rank in (0, 1):  # each rank's partition: unchanged by step 2, changed by step 3
        assert same(optimizer_state(tmp_path, 1, rank), optimizer_state(tmp_path, 2, rank))
        assert not same(optimizer_state(tmp_path, 2, rank), optimizer_state(tmp_path, 3, rank))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_a_lost_rank_on_another_node_fails_the_job_in_bounded_time(tiny_assets, tmp_path, mode):
    """Two per-node launchers (as under srun); after step 3, rank 1 is SIGKILLed or frozen (SIGSTOP,
    its sockets left open, as a node that stopped answering). A killed peer fails rank 0 at once,
    a frozen one after fault_tolerance.collective_timeout_s."""
    timeout_s = 120 if mode == "kill" else 20
    args = train_args(tiny_assets, tmp_path / "run", **{"fault_tolerance.collective_timeout_s": timeout_s})
    procs = start_two_node_launchers(tmp_path, args, base_env(MEDCARE_FAIL_AT=f"stage1:3:1:{mode}"),
                                     start_new_session=True)
    try:
        log = tmp_path / "run" / "train.log"
        t0 = time.time()
        while not (log.is_file() and "stage1 step 3/5" in log.read_text()):
            assert time.time() - t0 < 300 and procs[0].poll() is None, "rank 0 never reached step 3"
            time.sleep(0.2)
        lost_at = time.time()
        _, stderr = procs[0].communicate(timeout=timeout_s + 60)
        waited = time.time() - lost_at
        if mode == "kill":  # node 1's launcher sees its rank die and exits by itself
            procs[1].communicate(timeout=60)
    finally:
        for p in procs:  # a frozen node 1 plays a dead node: nothing there exits by itself
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert procs[0].returncode != 0
    if mode == "kill":
        assert procs[1].returncode != 0
        assert waited < timeout_s / 2, waited
    else:
        assert f"Timed out waiting {timeout_s * 1000}ms" in stderr
        assert timeout_s - 1 <= waited <= timeout_s + 45, waited
    ckpts = tmp_path / "run" / "stage1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000002"


def test_resume_refuses_other_settings_and_applies_a_new_lr(tiny_assets, tmp_path):
    overrides = {"stage": 1, "stage1.save_every": 2}
    proc = run(tiny_assets, tmp_path, {"MEDCARE_FAIL_AT": "stage1:3"}, **overrides)
    assert proc.returncode == -signal.SIGKILL
    ckpt = tmp_path / "stage1" / "checkpoints" / "step-0000002"

    proc = run(tiny_assets, tmp_path, **overrides, **{"adapters.expert_rank": 4, "stage1.global_batch_size": 16})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {ckpt}: this checkpoint was written under other settings" in proc.stderr
    assert "adapters.expert_rank: 8 in the checkpoint, 4 now" in proc.stderr
    assert "stage1.global_batch_size: 8 in the checkpoint, 16 now" in proc.stderr

    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    write_manifest(ckpt)  # as a 2-rank run would have published it
    proc = run(tiny_assets, tmp_path, **overrides)
    assert proc.returncode == 2 and "written by 2 ranks, and this run has 1" in proc.stderr, proc.stderr[-3000:]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(ckpt)

    # A new peak lr is taken from the resume on: the lr after step s is new_lr * f(s).
    cfg = load_config(str(RECIPE), train_args(tiny_assets, tmp_path, **overrides)[2:])
    new_lr = cfg.stage1.lr / 4
    proc = run(tiny_assets, tmp_path, **overrides, **{"stage1.lr": new_lr})
    check(proc, "the resume with a lower lr")
    assert "instead of the checkpoint's" in proc.stderr
    f = lr_lambda(cfg.stage1.lr_scheduler, math.ceil(cfg.stage1.warmup_ratio * 5), 5)
    lrs = dict(result(tmp_path)["result"]["lrs"])
    assert lrs[2] == pytest.approx(cfg.stage1.lr * f(2), rel=1e-6)   # before the crash
    for step in (3, 4):
        assert lrs[step] == pytest.approx(new_lr * f(step), rel=1e-6)


@pytest.mark.slow
def test_an_output_dir_the_nodes_do_not_share_is_refused_by_every_rank(tiny_assets, tmp_path):
    """Two per-node launchers in different working directories and a relative output_dir: each node
    sees its own directory, as with node-local disks. Checkpoints would be missing shards."""
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for cwd in cwds:
        cwd.mkdir()
    procs = start_two_node_launchers(tmp_path, train_args(tiny_assets, "run"), base_env(), cwds)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode != 0
        assert "1 of 2 ranks cannot see the files rank 0 writes there" in err, err[-3000:]
    assert "rank 1 on" in outs[1][1] and "does not" in outs[1][1]
    assert not (tmp_path / "node0" / "run" / "stage1").exists()  # stopped before any data or model work
