"""One run per output_dir: a lock file created atomically, naming the host and process that hold it.

`<output_dir>/.medcare.lock` is created with O_CREAT | O_EXCL, which is atomic on a local disk and on
the shared file systems clusters use (NFSv3 and later, Lustre, GPFS/Spectrum Scale, BeeGFS): of two
launches, exactly one creates it. The file holds JSON {host, pid, pid_start, started}. A second
launch reads it and stops (exit 2) naming the holder. A lock whose holder is on this host and no
longer running (its pid is gone, or now belongs to a process started later) is taken over; one held
from another host cannot be checked from here and must be removed by hand once that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from medcare_dist.errors import InputError

LOCK_NAME = ".medcare.lock"


class RunLockedError(InputError):
    pass


def _pid_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None when it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {when}"


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                   "started": time.time()}
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            return {}  # being written this instant, or damaged: treated as held by an unknown process

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") != self.me["host"] or not isinstance(holder.get("pid"), int):
            return False
        start = _pid_start(holder["pid"])
        return start is None or (start != "?" and holder.get("pid_start") not in (None, "?", start))

    def acquire(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released in between: try again
                if self._is_stale(holder):
                    # Renaming first: of two launches taking over the same stale lock, one rename succeeds.
                    try:
                        os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                        self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}").unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise RunLockedError(
                    f"output_dir {self.path.parent}: another run holds it ({_describe(holder)}; lock file "
                    f"{self.path}). Wait for it to end or stop it; if it is gone (a crash on another host), "
                    "delete the lock file") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise RunLockedError(f"output_dir {self.path.parent}: could not take the lock {self.path}")

    def release(self):
        """Remove the lock if it is still ours (never one a later run took over)."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)
