"""Process-group start-up and the few collectives the trainer needs."""

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from medcare_dist.errors import InputError


def init_distributed(timeout_s: int = 1800):
    """Join the job's process group (deepspeed launcher, torchrun, mpirun or a single process).

    gloo on CPU, nccl on CUDA; rank and world size come from the launcher's
    environment, or from MPI (mpi4py) when started by mpirun.
    """
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
            # A plain `python launch/train.py`: a world of one.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        from medcare_dist.training.preemption import deferred

        port = int(os.environ.get("MASTER_PORT", 29500))
        try:
            with deferred():  # DeepSpeed JIT-builds its CPU comm op here: a signal must not kill the compiler
                deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                           auto_mpi_discovery=True, verbose=False,
                                           timeout=timedelta(seconds=timeout_s), distributed_port=port)
        except (RuntimeError, OSError) as e:
            if "address already in use" not in str(e).lower() and "EADDRINUSE" not in str(e):
                raise
            raise InputError(f"MASTER_PORT {port} on {os.environ.get('MASTER_ADDR')} is taken: another job "
                             "(perhaps a second launch on the same output_dir) listens there; pass "
                             "--master_port to the launcher, or wait for that job") from None
    rank = dist.get_rank()
    _release_shm_name(rank)
    return rank, dist.get_world_size()


def _release_shm_name(rank: int):
    """Remove the /dev/shm name of DeepSpeed's CPU all-reduce buffer once every rank has mapped it.

    With all ranks on one host, DeepSpeed creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (about 67 MB, in RAM) and never unlinks it, so every run leaves its buffers behind until /dev/shm fills.
    Each rank maps every rank's buffer inside deepspeed.init_distributed; after a barrier the names can go,
    and the mappings stay valid until the processes exit.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")
    barrier()
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (a small picklable value: a key, an error message)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    """Every rank's `obj` (small and picklable: digests, an error message), in rank order."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None] * dist.get_world_size()
        dist.all_gather_object(box, obj)
        return box
    return [obj]
