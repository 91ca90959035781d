"""The one error type every input problem reaches the command line as (exit 2, one line)."""

import errno
import os
import shutil

# A write the file system refused: reported as one line naming the path, never a traceback.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


class InputError(Exception):
    """A file, setting or artefact the run cannot use as given; the message names it and says why.

    Every refusal of bad input (data rows, recipes, DeepSpeed configs, checkpoints, output directories)
    is a subclass, so the CLI prints one line and exits 2 for all of them, never a traceback.
    """


class StorageError(InputError):
    """output_dir's file system refused a write (full, over quota, read-only, no permission)."""


def storage_message(path, err: int, needed: int | None = None) -> str:
    """One line for a full disk, a quota or a permission refusal: the path, free and needed bytes, what to do."""
    path = str(path) if path else "(a file the run was writing)"
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system"}.get(err, "permission denied")
    room = ""
    if err in (errno.ENOSPC, errno.EDQUOT):
        probe = os.path.dirname(os.path.abspath(path))
        while probe and not os.path.isdir(probe):
            probe = os.path.dirname(probe)
        try:
            room = f" ({shutil.disk_usage(probe).free / 1e9:.2f} GB free there"
            room += f", about {needed / 1e9:.2f} GB needed)" if needed else ")"
        except OSError:
            room = ""
    return (f"{path}: {what}{room}; the run stopped and its last complete checkpoint is kept: free space "
            "(or fix the permissions) and rerun the same command to resume")
