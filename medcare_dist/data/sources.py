"""Rows of a local data source: a json/jsonl/parquet/arrow/csv file, a folder of them, or a `save_to_disk` dataset.

Every reader yields (1-based position, row dict or RowError) so that one bad row is reported with its place
(line of a JSON-lines file, item of a JSON array, row of a table) and never stops the scan. Training data
(`data.conversations`) and benchmark files (`eval.benchmarks`) both read tables through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medcare_dist.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = (".parquet", ".arrow", ".csv")
SUFFIXES = JSONL_SUFFIXES + (".json",) + TABLE_SUFFIXES
# What `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in their folder.
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


class DataError(InputError, ValueError):
    """Data that cannot be used as given; the message says where and why."""


class RowError(Exception):
    """One row that cannot be used: a stable reason key (counted in reports) and what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class SourceFile:
    """One readable unit of a source: `name` is what messages show, `unit` what a position counts."""

    name: str
    unit: str          # "line" | "item" | "row"
    rows: object       # iterator of (position, dict | RowError)
    # The `datasets` features the file declares (parquet/arrow written by datasets, save_to_disk), as
    # {column: feature dict}; a ClassLabel column says how its integers map to names.
    features: dict | None = None


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_DATASET_MARKERS)


def source_files(path, split: str | None = None) -> list[SourceFile]:
    """The files of a source in a stable order: the file itself, a folder's data files (sorted, recursively),
    or one split of a `save_to_disk` dataset."""
    path = Path(path)
    if is_saved_dataset(path):
        return [_saved_dataset(path, split)]
    if split is not None:
        raise DataError(f"{path}: 'split' is for datasets saved with save_to_disk, and this is not one "
                        f"(no {' or '.join(SAVED_DATASET_MARKERS)})")
    if path.is_dir():
        files = [p for p in _visible_files(path) if p.suffix.lower() in SUFFIXES]
        if not files:
            raise DataError(f"{path}: a folder with no data files (looked for {', '.join(SUFFIXES)}) and not a "
                            "save_to_disk dataset")
        return [_file(p) for p in files]
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return [_file(path)]


def _visible_files(folder: Path) -> list[Path]:
    """The files below a folder in name order, without hidden files or anything inside hidden folders."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _file(path: Path) -> SourceFile:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return SourceFile(str(path), "line", _json_lines(path))
    if suffix == ".json":
        # HF datasets reads JSON lines from .json files too: an array is told apart by its first byte.
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            return SourceFile(str(path), "item", _json_array(path))
        return SourceFile(str(path), "line", _json_lines(path))
    if suffix == ".parquet":
        return SourceFile(str(path), "row", _parquet(path), _parquet_features(path))
    if suffix == ".arrow":
        return SourceFile(str(path), "row", _arrow(path), _arrow_features(path))
    if suffix == ".csv":
        return SourceFile(str(path), "row", _csv(path))
    raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(SUFFIXES)}, a folder of them, "
                    "or a save_to_disk folder)")


def _json_lines(path: Path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, RowError("invalid_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                                                       "is not UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, RowError("invalid_json", f"{e.msg} (column {e.colno})")
            except RecursionError:
                yield lineno, RowError("invalid_json", "nested too deeply to parse")


def _json_array(path: Path):
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid_utf8: byte 0x{raw[e.start]:02x} is not UTF-8 "
                        "(a .json array is parsed as a whole, so the file cannot be read)") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid_json: {e.msg} (column {e.colno}; a .json array is parsed "
                        "as a whole, so the file cannot be read)") from None
    except RecursionError:
        raise DataError(f"{path}: invalid_json: nested too deeply to parse (a .json array is parsed as a "
                        "whole, so the file cannot be read)") from None
    yield from enumerate(items, 1)


def _batches_as_rows(batches):
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            index += 1
            yield index, row


def _hf_features(metadata) -> dict | None:
    """The features datasets stores in a schema's b"huggingface" metadata, if any."""
    raw = (metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else None
    except (ValueError, KeyError, TypeError):
        return None
    return features if isinstance(features, dict) else None


def _parquet_features(path: Path) -> dict | None:
    import pyarrow.parquet as pq

    try:
        return _hf_features(pq.read_schema(path).metadata)
    except Exception:  # a damaged file: reading its rows reports it
        return None


def _arrow_features(path: Path) -> dict | None:
    import pyarrow as pa

    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            return _hf_features(opener(pa.memory_map(str(path))).schema.metadata)
        except Exception:
            continue
    return None


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    yield from _batches_as_rows(parquet.iter_batches(batch_size=4096))


def _arrow(path: Path):
    import pyarrow as pa

    # datasets writes the Arrow IPC stream format; pyarrow/feather write the IPC file format.
    errors = []
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            reader = opener(pa.memory_map(str(path)))
        except Exception as e:  # pyarrow.ArrowInvalid for the other format, OSError for a damaged file
            errors.append(str(e))
            continue
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = reader
        yield from _batches_as_rows(batches)
        return
    raise DataError(f"{path}: not a readable Arrow IPC file or stream ({errors[-1]})")


def _csv(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    # Column types are inferred as datasets' csv loader does (integer answers stay integers); every cell
    # of a string column stays a string. Rows are counted after the header: row N is line N + 1 for
    # files without multi-line cells.
    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 22))
        yield from _batches_as_rows(reader)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None


def _saved_dataset(path: Path, split: str | None) -> SourceFile:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError, json/arrow errors of a damaged folder
        raise DataError(f"{path}: a save_to_disk folder that cannot be loaded ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None:
            raise DataError(f"{path}: a DatasetDict with splits {splits}; name one with 'split' "
                            f"(data source key, or --split)")
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (splits: {splits})")
        dataset, name = loaded[split], f"{path}[{split}]"
    else:
        if split is not None:
            raise DataError(f"{path}: a single Dataset, which has no split {split!r}")
        dataset, name = loaded, str(path)
    return SourceFile(name, "row", ((i, row) for i, row in enumerate(dataset, 1)), dataset.features.to_dict())


def rename_columns(row, columns: dict | None):
    """A row with `columns` ({our field: the source's column}) renamed to our field names."""
    if not columns or not isinstance(row, dict):
        return row
    missing = [theirs for theirs in columns.values() if theirs not in row]
    if missing:
        raise RowError("missing_column", f"no column {missing[0]!r} (from the source's 'columns' mapping; "
                                         f"columns: {', '.join(sorted(row)[:8])})")
    theirs = set(columns.values())
    out = {k: v for k, v in row.items() if k not in theirs}
    out.update({ours: row[col] for ours, col in columns.items()})
    return out


def source_digest(path) -> str:
    """sha256 of a source's bytes: the file's own, or over every file of a folder with its relative path
    ("unreadable" when it cannot be read; reading the rows then names the file and the reason)."""
    import hashlib

    from medcare_dist.training.integrity import file_sha256

    path = Path(path)
    try:
        if not path.is_dir():
            return file_sha256(path)
        h = hashlib.sha256()
        for p in _visible_files(path):
            h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
        return h.hexdigest()
    except OSError:
        return "unreadable"
