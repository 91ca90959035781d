"""A stage's tokenized data, built in slices by all ranks, saved under the run, memory-mapped by every rank.

The key covers everything the token ids depend on: the sources' bytes and settings (format, max_samples,
split, columns, weight), the seed (which subsets max_samples and weight keep), max_length, on_bad_row and
the tokenizer (vocabulary, merges, chat template, special tokens). Every rank reads and checks all rows (so bad data stops every rank with
the same message, with no collective), tokenizes one contiguous slice and saves it; rank 0 then
publishes the slices as one cache. A rerun of the same command (a resume) reuses the cache; any change
builds a new one and removes the old. Memory-mapped Arrow is one copy per node, in the page cache.
"""

import hashlib
import json
import shutil
from pathlib import Path

from medcare_dist.data.conversations import DataStats, _check_source, read_stage_conversations, tokenize_conversations
from medcare_dist.data.sources import source_digest
from medcare_dist.training import integrity

CACHE_VERSION = 2  # bump when tokenization or the cached layout changes
INDEX_NAME = "index.json"  # written last: a cache directory without it is incomplete


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocab, tokenizer.chat_template or "", tokenizer.all_special_tokens]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cache_key(sources, tokenizer, max_length: int, on_bad_row: str, seed: int) -> str:
    sources = [_check_source(s) for s in sources]
    parts = {"version": CACHE_VERSION, "max_length": max_length, "on_bad_row": on_bad_row, "seed": seed,
             "tokenizer": _tokenizer_digest(tokenizer),
             "sources": [{**s, "sha256": source_digest(s["path"])} for s in sources]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def is_built(root, key: str) -> bool:
    return (Path(root) / key / INDEX_NAME).is_file()


def _part(directory: Path, index: int) -> Path:
    return directory / f"part-{index:05d}"


def build_slice(root, key: str, sources, tokenizer, max_length: int, on_bad_row: str, seed: int,
                rank: int = 0, world: int = 1):
    """Tokenize this rank's contiguous slice (of `world`) of the stage's rows into a temporary part.

    Raises DataError on bad data, identically on every rank.
    """
    conversations, stats = read_stage_conversations(sources, max_length, on_bad_row, seed)
    n = len(conversations)
    dataset = tokenize_conversations(conversations[n * rank // world:n * (rank + 1) // world], tokenizer, stats,
                                     progress=rank == 0)
    part = _part(Path(root) / f".{key}.tmp", rank)
    shutil.rmtree(part, ignore_errors=True)
    part.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_to_disk(str(part))
    (part / "stats.json").write_text(json.dumps(stats.to_dict()))  # written last: marks the part complete
    integrity.fsync_tree(part)  # this rank's pages: rank 0 digests them next


def publish(root, key: str, world: int = 1):
    """Rank 0, once every rank's part is written: rename them into place and drop caches of other keys."""
    root = Path(root)
    tmp = root / f".{key}.tmp"
    parts = [DataStats(**json.loads((_part(tmp, r) / "stats.json").read_text())) for r in range(world)]
    for stale in tmp.glob("part-*"):  # from an earlier attempt with more ranks
        if int(stale.name.split("-")[1]) >= world:
            shutil.rmtree(stale, ignore_errors=True)
    (tmp / INDEX_NAME).write_text(json.dumps({"parts": world, "stats": DataStats.combine(parts).to_dict()}))
    integrity.publish_dir(tmp, root / key, inputs={"cache_key": key})
    for old in root.iterdir():  # an edited file, another tokenizer: those caches are stale
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)


def build(root, key: str, sources, tokenizer, max_length: int, on_bad_row: str, seed: int) -> bool:
    """The whole cache in one process; False if it was already there."""
    if is_built(root, key):
        return False
    build_slice(root, key, sources, tokenizer, max_length, on_bad_row, seed)
    publish(root, key)
    return True


def read_stats(root, key: str) -> DataStats:
    """The stats a published cache recorded (read before the rows: a cache of no rows cannot be loaded)."""
    return DataStats(**json.loads((Path(root) / key / INDEX_NAME).read_text())["stats"])


def load(root, key: str, rank: int = 0, world: int = 1):
    """(memory-mapped datasets.Dataset of the whole stage, DataStats) of a published cache, its digests
    checked first (the ranks split the files; a collective when world > 1)."""
    import datasets

    target = Path(root) / key
    integrity.verify_dir_on_all_ranks(target, "tokenized cache: delete that directory to rebuild it", rank, world)
    index = json.loads((target / INDEX_NAME).read_text())
    pieces = [datasets.load_from_disk(str(_part(target, r))) for r in range(index["parts"])]
    dataset = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    return dataset, DataStats(**index["stats"])
