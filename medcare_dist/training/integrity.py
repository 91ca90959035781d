"""Digests of every published artefact, checked when it is read back; fsync before each publishing rename.

A published directory (a checkpoint, adapters/, merged_base/, final/, a tokenized cache) carries
MANIFEST_NAME: the sha256 and size of every file under it, written last. Reading the directory back
verifies them, so bytes changed on disk (a flipped bit, a truncated copy, a file from another run)
stop the run with an ArtefactError naming the file instead of training on a different model.

Durability: os.replace is atomic against a process crash but not against a node losing power, so
every file is fsynced before its directory's rename, and the parent directory after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from medcare_dist.errors import InputError

MANIFEST_NAME = "MANIFEST.sha256.json"
FORMAT = "medcare-dist-manifest"
BLOCK = 1 << 23


class ArtefactError(InputError):
    """A published file that is missing, changed or unreadable; the message names it."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path):
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def listed_files(directory: Path) -> list[str]:
    """Relative paths of the regular files under `directory` a manifest covers (sorted)."""
    directory = Path(directory)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME)


def fsync_tree(directory: Path):
    directory = Path(directory)
    for p in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(p)
    fsync_path(directory)


def digest_files(directory: Path, names) -> dict:
    directory = Path(directory)
    return {n: {"sha256": file_sha256(directory / n), "bytes": (directory / n).stat().st_size} for n in names}


def share_modes(directory: Path):
    """Files 0666 and directories 0777 less the umask, as `open` would make them: writers that go through
    mkstemp (transformers' save_pretrained, safetensors) leave 0600, unreadable by the rest of a shared group."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [Path(directory), *Path(directory).rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def write_manifest(directory: Path, files: dict | None = None, inputs: dict | None = None) -> dict:
    """Write MANIFEST_NAME under `directory` (digests of `files`, or of every file there) and fsync the tree.

    `inputs` records what the artefact was made from (settings, digests of its inputs), so a rerun can
    tell whether it is still the one it would make."""
    directory = Path(directory)
    share_modes(directory)
    if files is None:
        files = digest_files(directory, listed_files(directory))
    manifest = {"format": FORMAT, "version": 1, "files": files, "inputs": inputs or {}}
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fsync_path(tmp)
    os.replace(tmp, directory / MANIFEST_NAME)
    fsync_tree(directory)
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtefactError(f"{path}: missing: {directory} has no digests, so it was not completely published "
                            "(or was written by a medcare-dist older than this one); it cannot be trusted")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a medcare-dist manifest")
        return manifest
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ArtefactError(f"{path}: corrupted ({e})") from None


def check_files(directory: Path, manifest: dict, names) -> list[str]:
    """Problems (one line each) of the listed files against the manifest; [] when all match."""
    directory = Path(directory)
    problems = []
    for name in names:
        want = manifest["files"][name]
        path = directory / name
        try:
            size = path.stat().st_size
            if size != want.get("bytes"):
                problems.append(f"{path}: corrupted ({size} bytes, {want.get('bytes')} when it was written)")
            elif file_sha256(path) != want.get("sha256"):
                problems.append(f"{path}: corrupted (its sha256 differs from the one recorded when it was written)")
        except FileNotFoundError:
            problems.append(f"{path}: missing (it was written with {directory.name} and is gone)")
        except OSError as e:
            problems.append(f"{path}: cannot read it ({e.strerror})")
    return problems


def verify_dir(directory: Path, what: str = "", share: tuple[int, int] = (0, 1)) -> dict:
    """Check every file of `directory` against its manifest (this process's `share` = (rank, world) of them
    when the ranks split the work). Raises ArtefactError naming the first bad file; returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    names = sorted(manifest["files"])
    rank, world = share
    problems = check_files(directory, manifest, names[rank::world])
    if problems:
        raise ArtefactError(problems[0] + (f" [{what}]" if what else "")
                            + (f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""))
    return manifest


def verify_dir_on_all_ranks(directory: Path, what: str, rank: int, world: int) -> dict:
    """verify_dir with the files split between the ranks; every rank raises the same error (no rank is
    left waiting in a later collective for one that stopped)."""
    from medcare_dist.training.distributed import all_gather_object

    try:
        manifest, problem = verify_dir(directory, what, share=(rank, world)), None
    except ArtefactError as e:
        manifest, problem = None, str(e)
    problems = [p for p in all_gather_object(problem) if p]
    if problems:
        raise ArtefactError(problems[0])
    return manifest


def manifest_inputs(directory: Path) -> dict:
    return read_manifest(directory).get("inputs", {})


def publish_dir(tmp: Path, final: Path, inputs: dict | None = None, files: dict | None = None) -> dict:
    """Digest and fsync `tmp`, then rename it to `final` (replacing it) and fsync the parent."""
    manifest = write_manifest(tmp, files=files, inputs=inputs)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(Path(final).parent)
    return manifest


def atomic_write_text(path: Path, text: str):
    """A small file replaced atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
