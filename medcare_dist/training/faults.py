"""Failure injection read from the environment, so the fault-tolerance tests break real runs, not mocks.

MEDCARE_FAIL_AT=<point>:<step>[:<rank>[:kill|hang]]
    The named rank (every rank if omitted) fails when it reaches the point: after optimizer step
    <step> of `stage1` / `stage2`; for `checkpoint`, once the checkpoint of that step is written but
    not yet published; for `merge`, half-way through writing the merged model (step 0).
    `kill` (the default) is SIGKILL: no exception handler, atexit hook or flush runs, as with a crashed
    process. `hang` is SIGSTOP: the process freezes with its sockets open, as with a node that stopped
    answering, so its peers learn of it only from the collective timeout.
MEDCARE_NONFINITE_AT=<stage>:<first>[-<last>][:<rank>[:loss|grad]]
    At those optimizer steps (1-based) of the stage, the rank's (every rank's) loss is made NaN (`loss`,
    the default), or only its gradient (`grad`: the loss stays finite, as in an overflow in backward).
"""

import logging
import os
import signal

import torch

log = logging.getLogger(__name__)


def _parse(name: str):
    spec = os.environ.get(name)
    return (spec, spec.split(":")) if spec else (None, None)


def injected_failure(point: str, step: int, rank: int):
    spec, parts = _parse("MEDCARE_FAIL_AT")
    if spec is None or parts[0] != point or int(parts[1]) != step:
        return
    if len(parts) > 2 and parts[2] not in ("", "*") and int(parts[2]) != rank:
        return
    mode = parts[3] if len(parts) > 3 else "kill"
    if mode not in ("kill", "hang"):
        raise ValueError(f"MEDCARE_FAIL_AT={spec}: the mode must be 'kill' or 'hang', not {mode!r}")
    log.error("MEDCARE_FAIL_AT=%s: rank %d %s now", spec, rank, "kills itself" if mode == "kill" else "freezes")
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)


def injected_nonfinite(stage: str, step: int, rank: int) -> str | None:
    """'loss' or 'grad' when MEDCARE_NONFINITE_AT names this stage, step and rank, else None."""
    spec, parts = _parse("MEDCARE_NONFINITE_AT")
    if spec is None or parts[0] != stage:
        return None
    first, _, last = parts[1].partition("-")
    if not int(first) <= step <= int(last or first):
        return None
    if len(parts) > 2 and parts[2] not in ("", "*") and int(parts[2]) != rank:
        return None
    kind = parts[3] if len(parts) > 3 else "loss"
    if kind not in ("loss", "grad"):
        raise ValueError(f"MEDCARE_NONFINITE_AT={spec}: the kind must be 'loss' or 'grad', not {kind!r}")
    return kind


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def poison(loss: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "loss":
        return loss * float("nan")
    return _NaNGradient.apply(loss)
