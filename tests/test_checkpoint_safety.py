"""Resuming reads DeepSpeed's checkpoint files with weights_only=True and refuses pickled code.

One process, a gloo world of one, a tiny ZeRO-3 engine on the CPU: a few seconds.
"""

import copy
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from medcare_dist.training import checkpoint as ckpt

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
    "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}
SAVED_STEP = 2


def make_engine(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=copy.deepcopy(DS_CONFIG))
    return engine


def train_step(engine, step: int):
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(step)).to(engine.device)
    engine.backward(engine(x).pow(2).mean())
    engine.step()


def full_params(engine) -> list[torch.Tensor]:
    from medcare_dist.training.zero import gathered

    params = list(engine.module.parameters())
    with gathered(params):
        return [p.detach().cpu().clone() for p in params]


def optimizer_tensors(engine) -> dict:
    """fp32 master partitions and Adam state (step, exp_avg, exp_avg_sq) of the ZeRO-3 optimizer."""
    sd = engine.optimizer.state_dict()
    out = {f"fp32_flat_groups.{i}": t.detach().clone() for i, t in enumerate(sd["fp32_flat_groups"])}
    for idx, state in sd["optimizer_state_dict"]["state"].items():
        out.update({f"state.{idx}.{k}": v.detach().clone() for k, v in state.items()})
    return out


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):
    """A checkpoint written after SAVED_STEP steps, and what the run that never stopped had then and one step on."""
    root = tmp_path_factory.mktemp("ckpts")
    engine = make_engine(seed=0)
    for step in range(SAVED_STEP):
        train_step(engine, step)
    trainer_state = {"stage": "stage1", "step": SAVED_STEP}
    path = ckpt.save_checkpoint(engine, root, SAVED_STEP, trainer_state, rank=0, world=1, keep_last=2)
    expected = {
        "path": path, "trainer_state": trainer_state, "rng": torch.get_rng_state(),
        "params": full_params(engine), "optimizer": optimizer_tensors(engine),
        "scheduler": copy.deepcopy(engine.lr_scheduler.state_dict()),
    }
    train_step(engine, SAVED_STEP)
    expected["params_next"] = full_params(engine)
    return expected


def test_resume_loads_every_file_weights_only_and_matches_the_uninterrupted_run(saved, monkeypatch):
    loads = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((Path(f).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    engine = make_engine(seed=1)  # other initial weights: the load must replace them
    ds_engine = engine.checkpoint_engine
    assert not all(torch.equal(a, b) for a, b in zip(full_params(engine), saved["params"]))
    torch.rand(3)  # move the RNG off the saved state
    monkeypatch.setattr(torch, "load", recording_load)
    state = ckpt.load_checkpoint(engine, saved["path"], rank=0)
    monkeypatch.undo()

    assert state == saved["trainer_state"]
    assert engine.checkpoint_engine is ds_engine
    # Every .pt file DeepSpeed wrote was read, and only through weights_only=True.
    assert {name for name, _ in loads} == {p.name for p in saved["path"].glob("*.pt")}
    assert all(weights_only is True for _, weights_only in loads), loads

    assert torch.equal(torch.get_rng_state(), saved["rng"])
    assert engine.global_steps == SAVED_STEP
    assert engine.lr_scheduler.state_dict() == saved["scheduler"]
    for a, b in zip(full_params(engine), saved["params"]):
        assert torch.equal(a, b)
    got = optimizer_tensors(engine)
    assert got.keys() == saved["optimizer"].keys() and any(k.endswith("exp_avg_sq") for k in got)
    for key, want in saved["optimizer"].items():
        assert torch.equal(got[key], want), key

    train_step(engine, SAVED_STEP)
    for a, b in zip(full_params(engine), saved["params_next"]):
        assert torch.equal(a, b)


def leave_marker(path):
    """The 'payload': harmless, but proof that unpickling ran code of the file's choosing."""
    Path(path).write_text("unpickling ran code from the checkpoint")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (leave_marker, (self.marker,))


@pytest.mark.parametrize("victim, writer", [
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "torch.save"),
    ("zero_pp_rank_0_mp_rank_00_model_states.pt", "pickle"),
])
def test_checkpoint_file_with_code_is_refused_without_running_it(saved, tmp_path, victim, writer):
    path = tmp_path / saved["path"].name
    shutil.copytree(saved["path"], path)
    marker = tmp_path / "pwned"
    evil = {"optimizer_state_dict": Payload(marker), "module": {}}
    if writer == "torch.save":
        torch.save(evil, path / victim)
    else:
        (path / victim).write_bytes(pickle.dumps(evil, protocol=2))

    engine = make_engine(seed=1)
    ds_engine = engine.checkpoint_engine
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(engine, path, rank=0)
    msg = str(err.value)
    assert msg.startswith(f"{path / victim}: refusing to unpickle ") and "leave_marker" in msg, msg
    assert "weights_only=True" in msg
    assert not marker.exists()
    assert engine.checkpoint_engine is ds_engine

    # The payload is live: DeepSpeed's own loader (weights_only=False) would have run it.
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    try:
        TorchCheckpointEngine().load(str(path / victim), map_location="cpu")
    except RuntimeError:
        assert writer == "pickle"  # a bare pickle is no torch file: refused only after it has been unpickled
    assert marker.exists()
