"""Resumable training checkpoints, published atomically.

Layout under `<stage dir>/checkpoints/`:
  step-0000050/        DeepSpeed engine state (adapters, optimizer, scheduler)
                       + trainer_state.json + rng_rank<r>.safetensors
  latest               name of the newest complete checkpoint
Every rank writes into `.tmp-step-...`; after a barrier rank 0 renames it and
only then rewrites `latest`, so a checkpoint cut off half-way is never seen.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
STATE_NAME = "trainer_state.json"


def _atomic_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, root, step: int, trainer_state: dict, rank: int, barrier, keep_last: int):
    root = Path(root)
    tag = f"step-{step:07d}"
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True)
    save_file(rng_state(), str(root / tmp_tag / f"rng_rank{rank}.safetensors"))
    barrier()
    if rank == 0:
        (root / tmp_tag / STATE_NAME).write_text(json.dumps(trainer_state, indent=1))
        shutil.rmtree(root / tag, ignore_errors=True)
        os.replace(root / tmp_tag, root / tag)
        _atomic_text(root / LATEST, tag)
        prune(root, keep_last)
    barrier()
    return root / tag


def complete_checkpoints(root) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE_NAME).is_file())


def latest_checkpoint(root) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if it is missing."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / STATE_NAME).is_file():
            return root / tag
    done = complete_checkpoints(root)
    return done[-1] if done else None


def prune(root, keep_last: int):
    """Delete all but the newest `keep_last` complete checkpoints (never the latest one)."""
    done = complete_checkpoints(root)
    latest = latest_checkpoint(root)
    for path in done[: max(0, len(done) - max(1, keep_last))]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)
    for path in Path(root).glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, path: Path, rank: int) -> dict:
    """Restore engine, RNG and trainer state from a complete checkpoint."""
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)))
    return json.loads((path / STATE_NAME).read_text())
