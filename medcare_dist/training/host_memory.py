"""A rank's resident memory phase by phase (start, peak, end), and what its training tensors account for.

The figures are the process's resident set from /proc/self/status: what the host must provide, whatever
allocated it (tensors, the allocator's free lists, libraries, memory-mapped files that were read). The
peak within a phase is VmHWM after resetting it at the phase's start (/proc/self/clear_refs "5"), so a
phase's peak is its own, not the process's so far.
"""

import contextlib
import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

GiB = 2 ** 30
_STATUS_KEYS = {"VmRSS": "rss", "VmHWM": "hwm", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def status() -> dict:
    """Resident bytes: rss (all), hwm (peak since the last reset), anon, file, shmem. {} off Linux."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _STATUS_KEYS:
                    out[_STATUS_KEYS[key]] = int(rest.split()[0]) * 1024
    except OSError:
        return {}
    return out


def reset_peak() -> bool:
    """Make VmHWM the current resident size (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")  # may run ldconfig: once per process
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim).

    Loading a checkpoint frees gigabytes of temporaries at once; glibc keeps freed heap memory in its arenas,
    so without this the resident set stays at the loading peak for the whole run. Costs about 3 ms.
    """
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


class PhaseMemory:
    """Resident bytes at the start and end of named phases and the peak within each; phases may nest."""

    def __init__(self):
        self.available = bool(status()) and reset_peak()
        self.records: dict[str, dict] = {}
        self._open: list[dict] = []

    def _raise_open_peaks(self, hwm: int):
        for rec in self._open:
            rec["peak"] = max(rec["peak"], hwm)

    @contextlib.contextmanager
    def phase(self, name: str, trim: bool = False):
        """Record `name`; with trim, the heap's free pages are returned first (see release_free_heap)."""
        if not self.available:
            yield
            return
        if trim:
            release_free_heap()
        before = status()
        self._raise_open_peaks(before["hwm"])
        reset_peak()
        rec = {"start": before["rss"], "peak": before["rss"]}
        self._open.append(rec)
        try:
            yield rec
        finally:
            after = status()
            self._open.pop()
            rec["peak"] = max(rec["peak"], after["hwm"])
            self._raise_open_peaks(rec["peak"])
            reset_peak()
            rec.update(end=after["rss"], end_anon=after.get("anon", 0), end_file=after.get("file", 0))
            self.records[name] = rec

    def peak(self) -> int:
        return max((r["peak"] for r in self.records.values()), default=0)

    def as_dict(self) -> dict:
        return {name: dict(rec) for name, rec in self.records.items()}


def engine_tensor_bytes(engine) -> dict:
    """Bytes this rank holds in the training state of a DeepSpeed engine, by role.

    Read from the ZeRO-3 optimizer's own buffers where it has them (partitions, fp32 master, gradient
    partitions, reduce buckets), else from the parameters; Adam's moments from the inner optimizer.
    """
    import torch

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))

    frozen_part = frozen_whole = trainable_whole = 0
    for p in engine.module.parameters():
        shard = getattr(p, "ds_tensor", None)
        whole = p.data.numel() * p.element_size()  # under ZeRO-3: a [0] placeholder unless persistent/gathered
        if p.requires_grad:
            trainable_whole += whole
        else:
            frozen_whole += whole
            if shard is not None and not getattr(p, "ds_persist", False):
                frozen_part += shard.numel() * shard.element_size()
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    adam = nbytes(v for st in getattr(inner, "state", {}).values() for v in st.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    out = {"backbone partitions": frozen_part,
           "backbone whole tensors (persistent or unpartitioned)": frozen_whole,
           "adapter whole tensors (persistent or unpartitioned)": trainable_whole,
           "adapter partitions (training dtype)": nbytes(getattr(opt, "fp16_partitioned_groups_flat", []) or []),
           "adapter fp32 master partitions": nbytes(getattr(opt, "fp32_partitioned_groups_flat", []) or []),
           "Adam moments": adam,
           "gradient partitions": nbytes([getattr(opt, "grad_partitions_flat_buffer", None)]),
           "reduce buckets (allocated)": nbytes(getattr(b, "buffer", None)
                                                for b in getattr(opt, "ipg_buckets", {}).values())}
    return out
