"""Resumable training checkpoints, published atomically.

Layout under `<stage dir>/checkpoints/`:
  step-0000050/        DeepSpeed engine state (adapters, optimizer, scheduler)
                       + trainer_state.json + rng_rank<r>.safetensors
  latest               name of the newest complete checkpoint
Every rank writes into `.tmp-step-...` and fsyncs what it wrote; after a barrier the
ranks digest the files between them (training/integrity.py), rank 0 writes the
manifest, renames the directory and only then rewrites `latest`, so a checkpoint
cut off half-way is never seen, and one whose bytes changed on disk is refused
on resume (the previous complete one is used instead, with a warning).

Resuming never runs pickled code: DeepSpeed's `.pt` files are read with
`torch.load(weights_only=True)` (tensors, plain containers and the few DeepSpeed
types in SAFE_GLOBALS), and a file that needs anything else is refused with a
CheckpointError naming it. RNG state is safetensors, trainer state JSON.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medcare_dist.training.distributed import all_gather_object, barrier
from medcare_dist.errors import InputError, StorageError, storage_message
from medcare_dist.training.faults import injected_failure
from medcare_dist.training import integrity

LATEST = "latest"
# Seconds of the last save / verification on this rank, split into DeepSpeed's write and our digests + fsync:
# the cost of verified artefacts, logged at each checkpoint (docs/benchmarks_train.md).
LAST_TIMINGS: dict = {}
STATE_NAME = "trainer_state.json"


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, root, step: int, trainer_state: dict, rank: int, world: int, keep_last: int):
    """Write, digest and publish one checkpoint. A collective: every rank calls it at the same step."""
    import time

    root = Path(root)
    tag = f"step-{step:07d}"
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    t0 = time.perf_counter()
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True)
        save_file(rng_state(), str(root / tmp_tag / f"rng_rank{rank}.safetensors"))
    except RuntimeError as e:
        # torch.save reports a failed write as "enforce fail at inline_container.cc ...", naming no path.
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        raise StorageError(storage_message(root / tmp_tag, _write_errno(root), _bytes_of(engine))) from None
    if rank == 0:
        (root / tmp_tag / STATE_NAME).write_text(json.dumps(trainer_state, indent=1))
    t1 = time.perf_counter()
    # Each rank flushes the files it wrote (fsync flushes only the caller's dirty pages on a network
    # file system), then the ranks split the hashing.
    for name in integrity.listed_files(root / tmp_tag):
        integrity.fsync_path(root / tmp_tag / name)
    injected_failure("checkpoint", step, rank)  # written but not published: must never be loaded
    barrier()
    names = integrity.listed_files(root / tmp_tag)
    digests = {}
    for part in all_gather_object(integrity.digest_files(root / tmp_tag, names[rank::world])):
        digests.update(part)
    if rank == 0:
        integrity.publish_dir(root / tmp_tag, root / tag, files=digests,
                              inputs={"stage": trainer_state.get("stage"), "step": step})
        integrity.atomic_write_text(root / LATEST, tag)
        prune(root, keep_last)
    barrier()
    LAST_TIMINGS.update(write_s=t1 - t0, digest_fsync_s=time.perf_counter() - t1,
                        bytes=sum(f["bytes"] for f in digests.values()))
    return root / tag


def _write_errno(root: Path) -> int:
    """Why a write under `root` failed, as an errno: no space unless the directory is not writable."""
    import errno

    return errno.ENOSPC if os.access(root, os.W_OK) else errno.EACCES


def checkpoint_bytes(trainable: int, dtype: str = "bf16", world: int = 1) -> int:
    """About what one checkpoint takes: fp32 master copy and Adam moments of the trainable parameters, their
    module copy in `dtype`, and a little per rank."""
    return trainable * (12 + {"fp32": 4}.get(dtype, 2)) + (1 << 20) * world


def _bytes_of(engine) -> int:
    return checkpoint_bytes(sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()
                                if p.requires_grad), "fp32")


def complete_checkpoints(root) -> list[Path]:
    """Published checkpoints (a trainer state and a manifest), oldest first; their bytes are not checked."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE_NAME).is_file() and (p / integrity.MANIFEST_NAME).is_file())


def latest_checkpoint(root) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if it is missing."""
    root = Path(root)
    pointer = root / LATEST
    done = complete_checkpoints(root)
    if pointer.is_file():
        tag = pointer.read_text(errors="replace").strip()
        if root / tag in done:
            return root / tag
    return done[-1] if done else None


def verified_checkpoint(root, rank: int, world: int, log=None) -> Path | None:
    """The newest complete checkpoint whose every file matches its digest (the ranks split the check).

    A damaged newest one is skipped with a warning for the one before; when every one is damaged the
    run stops (ArtefactError naming the files) rather than silently starting the stage over."""
    done = complete_checkpoints(root)
    latest = latest_checkpoint(root)
    if latest is None:
        return None
    import time

    candidates = [latest] + [p for p in reversed(done) if p != latest]
    damaged = []
    for path in candidates:
        t0 = time.perf_counter()
        try:
            integrity.verify_dir(path, share=(rank, world))
            LAST_TIMINGS["verify_s"] = time.perf_counter() - t0
            problem = None
        except integrity.ArtefactError as e:
            problem = str(e)
        problems = [p for p in all_gather_object(problem) if p]
        if not problems:
            if damaged and log is not None and rank == 0:
                log.warning("checkpoint %s is damaged (%s): resuming from the previous complete one, %s",
                            damaged[-1][0].name, damaged[-1][1], path.name)
            return path
        damaged.append((path, problems[0]))
    raise integrity.ArtefactError("every checkpoint under " + str(root) + " is damaged: "
                                  + "; ".join(p for _, p in damaged)
                                  + f". Delete {root} to start the stage over")


def prune(root, keep_last: int):
    """Delete all but the newest `keep_last` complete checkpoints (never the latest one)."""
    done = complete_checkpoints(root)
    latest = latest_checkpoint(root)
    for path in done[: max(0, len(done) - max(1, keep_last))]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)
    for path in Path(root).glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)


class CheckpointError(InputError):
    """A checkpoint file that is refused or cannot be read; the message names the file."""


# The only non-tensor types DeepSpeed 0.19 pickles into ZeRO checkpoints, found by saving
# fp32, bf16, fp16 and CPU-offload ZeRO-3 checkpoints and listing what weights_only rejects;
# all in the zero optimizer-state file (model-state files need none). Module paths, so that
# importing this module does not import DeepSpeed.
SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",           # optimizer_state_dict["zero_stage"]
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",         # optimizer_state_dict["loss_scaler"]: fp32/bf16
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same with fp16 dynamic loss scaling
)


def _safe_globals() -> list:
    import importlib

    out = []
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def _refused(message: str) -> str:
    """What torch's weights_only unpickler objected to, from its error message."""
    m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    if m:
        return m.group(1)
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.startswith("Check the documentation")]
    return f"it ({lines[-1] if lines else message})"


def safe_load(path, map_location="cpu"):
    """torch.load with weights_only=True and only SAFE_GLOBALS allowed beyond torch's defaults."""
    # A context manager, not add_safe_globals: the allow-list holds for our loads only.
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            allowed = ", ".join(name.rsplit(".", 1)[1] for name in SAFE_GLOBALS)
            raise CheckpointError(
                f"{path}: refusing to unpickle {_refused(str(e))} (checkpoints are loaded with weights_only=True, "
                f"which allows only tensors, plain containers and {allowed}); no code of the file's choosing "
                "was run. Either it was not written by this trainer or has been altered, or another DeepSpeed "
                "version pickles a type not yet in medcare_dist.training.checkpoint.SAFE_GLOBALS (add it there only if "
                "you trust the file)") from None
        except (OSError, RuntimeError, EOFError) as e:
            # torch's messages for truncated or foreign files do not say which file.
            raise CheckpointError(f"{path}: cannot read this checkpoint file ({e})") from e


class _WeightsOnlyLoads:
    """Stands in for `engine.checkpoint_engine` during a load: every `load` goes through
    safe_load, everything else (save, commit, ...) to the engine DeepSpeed configured."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return safe_load(path, map_location=map_location)


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of a complete checkpoint (step, stage, world size, settings, results so far)."""
    file = Path(path) / STATE_NAME
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read it ({e}); delete {path} to resume from the one before") from e


def load_checkpoint(engine, path: Path, rank: int) -> dict:
    """Restore engine, RNG and trainer state from a complete checkpoint."""
    if engine.load_universal_checkpoint():
        # Universal checkpoints are read by ZeRO's own torch.load(weights_only=False) calls,
        # which bypass the checkpoint engine; refuse rather than load them unchecked.
        raise CheckpointError(f"{path}: load_universal_checkpoint is set in the DeepSpeed config; "
                              "universal checkpoints would be unpickled without weights_only")
    # ZeRO's model- and optimizer-state files are all read through engine.checkpoint_engine.load
    # (DeepSpeedEngine._load_checkpoint via SDLoader, _get_all_zero_checkpoint_state_dicts).
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(inner)
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    finally:
        engine.checkpoint_engine = inner
    if load_path is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)))
    return read_trainer_state(path)
