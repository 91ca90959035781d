"""Checkpoint-and-requeue on a preemption signal (SLURM's --signal, a scheduler's SIGTERM).

The handler only sets a flag; the training loop looks at it after each optimizer step. All ranks
must stop at the same step, so the flag is agreed on with a collective (any rank that saw the
signal stops every rank). The loop then writes a checkpoint and exits with PREEMPT_EXIT_CODE,
which launch/slurm/train.sbatch turns into `scontrol requeue`; the requeued job resumes from
that checkpoint.

Integration in a training loop (medcare_dist/training/trainer.py):

    preemption.install()                                 # once, in the main thread
    for step in ...:
        ... optimizer step ...
        if preemption.should_stop(device):               # one tiny all-reduce, every rank agrees
            save_checkpoint(step + 1)
            preemption.exit_for_requeue()                # SystemExit(PREEMPT_EXIT_CODE)

The agreement can also ride on an all-reduce the loop already does: add
`preemption.local_flag()` (0.0 / 1.0) to a summed tensor and stop when the sum is > 0.

Which signals: MEDCARE_PREEMPT_SIGNALS, comma separated (default "USR1,TERM,INT"; "" or "none"
installs nothing). A second signal does not kill the process: it only repeats the request
(the DeepSpeed launcher forwards the SIGTERM it receives, so each rank may see two); use
SIGKILL to stop a rank at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later": a checkpoint was written and the job
# wants to be requeued. Distinct from Python's 1, torch elastic's codes and death by signal (128+N).
PREEMPT_EXIT_CODE = 75
DEFAULT_SIGNALS = "USR1,TERM,INT"
ENV_SIGNALS = "MEDCARE_PREEMPT_SIGNALS"

_state = {"signal": None, "time": None, "installed": {}}
_lock = threading.Lock()


def _handler(signum, frame):
    # Only a flag: a signal handler runs between two bytecodes of the main thread and must not touch
    # collectives, files or locks the interrupted code may hold.
    if signum == signal.SIGINT and _state["signal"] == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    if _state["signal"] is None:
        _state["signal"] = signum
        _state["time"] = time.time()


def parse_signals(spec: str | None) -> list[signal.Signals]:
    """'USR1,TERM' / 'SIGUSR1 SIGTERM' / '10,15' -> [Signals.SIGUSR1, Signals.SIGTERM]; '' / 'none' -> []."""
    if spec is None:
        spec = DEFAULT_SIGNALS
    out = []
    for item in spec.replace(",", " ").split():
        if item.lower() == "none":
            continue
        name = item.upper()
        try:
            sig = signal.Signals(int(name)) if name.isdigit() else signal.Signals[
                name if name.startswith("SIG") else "SIG" + name]
        except (KeyError, ValueError):
            raise ValueError(f"{ENV_SIGNALS}: unknown signal {item!r}") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{ENV_SIGNALS}: {sig.name} cannot be caught")
        if sig not in out:
            out.append(sig)
    return out


def install(signals=None) -> list[signal.Signals]:
    """Route the preemption signals to the flag. Idempotent; a no-op (with a warning) outside the main thread.

    `signals`: a list of signal numbers / names, or None for $MEDCARE_PREEMPT_SIGNALS (default USR1,TERM,INT).
    Returns the signals now handled.
    """
    if signals is None:
        wanted = parse_signals(os.environ.get(ENV_SIGNALS))
    else:
        wanted = parse_signals(",".join(str(int(s)) if not isinstance(s, str) else s for s in signals))
    if threading.current_thread() is not threading.main_thread():
        log.warning("preemption handler not installed: signal handlers can only be set from the main thread")
        return []
    with _lock:
        for sig in wanted:
            if sig not in _state["installed"]:
                _state["installed"][sig] = signal.signal(sig, _handler)
        return list(_state["installed"])


@contextlib.contextmanager
def deferred():
    """Hold the preemption signals back (blocked, not lost) while start-up work runs: DeepSpeed's JIT op
    builds and engine set-up. Blocked signals stay pending, and children started meanwhile (ninja, the
    compiler) inherit the mask, so a SIGUSR1 that SLURM sends to every process of the step cannot kill a
    build half-way. On leaving, a pending signal reaches the handler: training checkpoints at its first step.
    """
    wanted = [s for s in _state["installed"]] or parse_signals(os.environ.get(ENV_SIGNALS))
    if threading.current_thread() is not threading.main_thread() or not wanted:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def watch_launcher(interval_s: float = 2.0) -> list[int]:
    """Under DeepSpeed's launcher, stop (checkpoint, exit 75) when the command the user started dies.

    `deepspeed` (the runner) has no SIGTERM handler: a SIGTERM to it kills it at once and leaves its child,
    the per-node launch.py, and the ranks running to the end. Each rank therefore watches its launch.py
    and the runner above it; when either is gone it asks for a stop, as the signal would have. Returns the
    pids watched ([] outside the DeepSpeed launcher: a plain `python launch/train.py` run under nohup
    must outlive its shell)."""
    parent = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(parent):
        return []
    watched = [parent]
    runner = _parent_of(parent)
    if runner and "deepspeed" in _cmdline(runner) and "launcher.launch" not in _cmdline(runner):
        watched.append(runner)

    def watch():
        while not requested():
            gone = [pid for pid in watched if not os.path.exists(f"/proc/{pid}")] or (
                [parent] if os.getppid() != parent else [])
            if gone:
                log.warning("the launcher (pid %s: %s) is gone: stopping at the next step after a checkpoint",
                            gone[0], "launch.py" if gone[0] == parent else "deepspeed")
                request(signal.SIGTERM)
                return
            time.sleep(interval_s)

    threading.Thread(target=watch, name="medcare-launcher-watch", daemon=True).start()
    return watched


def uninstall():
    """Restore the handlers install() replaced (tests; a library user done with training)."""
    with _lock:
        for sig, previous in _state["installed"].items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        _state["installed"].clear()


def reset():
    """Forget a received signal (tests; after a checkpoint when the job chose to continue)."""
    _state["signal"] = None
    _state["time"] = None


def request(signum: int = signal.SIGUSR1):
    """Ask for a checkpoint-and-requeue from code, as the signal would."""
    _handler(signum, None)


def requested() -> bool:
    """Whether this process received a preemption signal."""
    return _state["signal"] is not None


def received_signal() -> signal.Signals | None:
    s = _state["signal"]
    return signal.Signals(s) if s is not None else None


def local_flag() -> float:
    """1.0 if this rank was signalled, else 0.0: add it to a summed all-reduce the loop already does."""
    return 1.0 if requested() else 0.0


def should_stop(device=None) -> bool:
    """True on every rank if any rank was signalled (one all-reduce of one element; local answer without a
    process group). Every rank must call it at the same point of the loop."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return requested()
    flag = torch.tensor([local_flag()], dtype=torch.float32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def exit_for_requeue(message: str | None = None):
    """Leave the job with PREEMPT_EXIT_CODE after the checkpoint was written (every rank calls it)."""
    sig = received_signal()
    why = f"{sig.name}" if sig is not None else "a preemption request on another rank"
    log.warning("%s; exiting with code %d so the job is requeued and resumes from the checkpoint",
                message or f"preempted by {why}", PREEMPT_EXIT_CODE)
    _record_exit(message or f"preempted by {why}")
    _leave_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(PREEMPT_EXIT_CODE)


def _record_exit(message: str):
    """Global rank 0 writes PREEMPT_EXIT_CODE to $MEDCARE_EXIT_RECORD (set by train.sbatch): a launcher killed by
    the same signal (SIGTERM from `scontrol requeue` reaches every process of the job) reports 143 or 1, and the
    batch script reads here that the ranks did checkpoint."""
    path = os.environ.get("MEDCARE_EXIT_RECORD")
    if not path or os.environ.get("RANK", "0") != "0":
        return
    try:
        with open(path, "w") as f:
            f.write(f"{PREEMPT_EXIT_CODE} {message}\n")
    except OSError as e:
        log.warning("could not write MEDCARE_EXIT_RECORD=%s: %s", path, e)


def _leave_process_group():
    """Meet the other ranks once more and close the group: a rank whose peers vanish while it tears down gloo /
    NCCL can abort ("terminate called without an active exception") and report 134 instead of the requeue code."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception as e:  # exiting anyway: the checkpoint is already complete
        log.warning("leaving the process group: %s", e)
