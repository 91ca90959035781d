"""A stage's tokenized data, built once by one process, saved under the run and memory-mapped by every rank.

The key covers everything the token ids depend on: the source files' bytes, formats and max_samples,
the seed (which subset max_samples keeps), max_length, on_bad_row and the tokenizer (vocabulary, merges,
chat template, special tokens). A rerun of the same command (a resume) reuses the cache instead of
tokenizing again; any change builds a new one and removes the old. Without it every rank would tokenize
every file and hold its own copy of the result; memory-mapped Arrow is one copy per node, in page cache.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

from .data import DataStats, _check_source, load_stage_dataset

CACHE_VERSION = 1  # bump when tokenization or the cached layout changes
STATS_NAME = "stats.json"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
    except OSError:
        return "unreadable"  # load_stage_dataset names the file and the reason
    return h.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocab, tokenizer.chat_template or "", tokenizer.all_special_tokens]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cache_key(sources, tokenizer, max_length: int, on_bad_row: str, seed: int) -> str:
    sources = [_check_source(s) for s in sources]
    parts = {"version": CACHE_VERSION, "max_length": max_length, "on_bad_row": on_bad_row, "seed": seed,
             "tokenizer": _tokenizer_digest(tokenizer),
             "sources": [{**s, "sha256": _file_digest(s["path"])} for s in sources]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def build(root, key: str, sources, tokenizer, max_length: int, on_bad_row: str, seed: int) -> bool:
    """Tokenize into `root/key` unless it is there; False on a cache hit. Raises DataError on bad data."""
    root = Path(root)
    target = root / key
    if (target / STATS_NAME).is_file():
        return False
    dataset, stats = load_stage_dataset(sources, tokenizer, max_length, on_bad_row, seed)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    (tmp / STATS_NAME).write_text(json.dumps(stats.to_dict(), indent=1))  # written last: marks it complete
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    for old in root.iterdir():  # caches of other keys (an edited file, another tokenizer) are stale
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return True


def load(root, key: str):
    """(memory-mapped datasets.Dataset, DataStats) of a built cache."""
    import datasets

    target = Path(root) / key
    stats = DataStats(**json.loads((target / STATS_NAME).read_text()))
    return datasets.load_from_disk(str(target)), stats
