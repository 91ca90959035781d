"""Training data in three chat formats (ShareGPT, OpenAI messages, Alpaca), validated row by row.

Rows come from any local source (`data.sources`) and become token ids with loss on assistant replies and
tool calls only; `python -m medcare_dist.data check SOURCE...` validates sources without training.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass, field

from medcare_dist.data.sources import DataError, RowError, rename_columns, source_files

log = logging.getLogger(__name__)

# "sharegpt" is the name LLaMA-Factory and most exports use for the `conversations` (from/value) layout.
FORMATS = ("auto", "conversations", "sharegpt", "messages", "alpaca")
ROLE_ALIASES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
IGNORE_INDEX = -100
MAX_LISTED_BAD_ROWS = 20


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int    # 1-based; a line for JSON lines, an array item for .json arrays, a row for tables
    reason: str  # a stable key, counted in DataStats.bad_rows
    detail: str
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}: {self.unit} {self.line}"
        return f"{where}: {self.reason}: {self.detail}"


class Conversation(list):
    """A checked list of chat messages; `tools` holds the function schemas offered to the model, if any."""

    tools: list | None = None


# ----- formats -------------------------------------------------------------------------------------------

def _text(content, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text parts are accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content, 1):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError("unsupported_content", f"{where} part {j} is {kind!r}; only text parts are trained")
        return "".join(texts)
    raise RowError("wrong_type", f"{where} content is {type(content).__name__}, not a string or a list of parts")


def _arguments(value, where: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise RowError("bad_tool_call", f"{where} arguments are not JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise RowError("bad_tool_call", f"{where} arguments are {type(value).__name__}, not an object")
    return value


def _tool_call(call, where: str) -> dict:
    """One call as {"type": "function", "function": {"name", "arguments": dict}} (what chat templates read)."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = {**call["function"], "id": call.get("id")}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise RowError("bad_tool_call", f"{where} needs a function name")
    out = {"type": "function", "function": {"name": call["name"],
                                            "arguments": _arguments(call.get("arguments", {}), where)}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


def _function_call_turn(value, where: str) -> list[dict]:
    """ShareGPT's function_call turn: a JSON object {"name", "arguments"}, or a list of them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError("bad_tool_call", f"{where} function_call is not JSON: {e.msg}") from None
    calls = value if isinstance(value, list) else [value]
    return [_tool_call(c, f"{where} call {j}") for j, c in enumerate(calls, 1)]


def _message_list(items, field_name: str) -> list[dict]:
    if not isinstance(items, list):
        raise RowError("wrong_type", f"'{field_name}' is {type(items).__name__}, not a list")
    messages = []
    for i, item in enumerate(items, 1):
        where = f"{field_name}[{i}]"
        if not isinstance(item, dict):
            raise RowError("wrong_type", f"{where} is {type(item).__name__}, not an object")
        # Both key styles are accepted in both formats: exports mix them more often than not.
        role = item.get("from", item.get("role"))
        has_content = "value" in item or "content" in item
        content = item.get("value", item.get("content"))
        if role is None or not (has_content or item.get("tool_calls")):
            raise RowError("missing_field", f"{where} needs from/value or role/content")
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise RowError("unknown_role", f"{where} has role {role!r} "
                                           f"(expected one of {', '.join(sorted(ROLE_ALIASES))})")
        role = role.lower()
        if role == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _function_call_turn(content, where)})
            continue
        message = {"role": ROLE_ALIASES[role], "content": "" if content is None else _text(content, where)}
        if item.get("tool_calls"):
            if message["role"] != "assistant" or not isinstance(item["tool_calls"], list):
                raise RowError("bad_tool_call", f"{where}: tool_calls must be a list on an assistant message")
            message["tool_calls"] = [_tool_call(c, f"{where} tool_calls[{j}]")
                                     for j, c in enumerate(item["tool_calls"], 1)]
        elif content is None:
            raise RowError("wrong_type", f"{where} content is null (allowed only with tool_calls)")
        for key in ("tool_call_id", "name"):
            if message["role"] == "tool" and isinstance(item.get(key), str):
                message[key] = item[key]
        messages.append(message)
    return messages


def _tools(obj: dict):
    tools = obj.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowError("bad_tools", f"'tools' is not JSON: {e.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("bad_tools", "'tools' must be a list of function schemas")
    return tools


def _alpaca_messages(obj: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in obj:
            raise RowError("missing_field", f"alpaca row has no '{key}'")
    for key in ("instruction", "input", "output", "system"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise RowError("wrong_type", f"'{key}' is {type(obj[key]).__name__}, not a string")
    messages = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        raise RowError("wrong_type", "'history' must be a list of [instruction, output] string pairs")
    for query, answer in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    prompt = "\n".join(part for part in (obj["instruction"], obj.get("input")) if part)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    return messages


def detect_format(obj: dict) -> str:
    if "conversations" in obj:
        return "conversations"
    if "messages" in obj:
        return "messages"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    raise RowError("unknown_format", "row has none of 'conversations', 'messages', 'instruction' "
                                     f"(keys: {', '.join(sorted(obj)[:8]) or 'none'})")


def normalize_row(obj, fmt: str = "auto") -> Conversation:
    """A row of any supported format as a checked Conversation ending with an assistant turn.

    Empty system messages are dropped and so are turns after the last assistant
    reply (they could carry no label); anything else wrong raises RowError.
    """
    if not isinstance(obj, dict):
        raise RowError("not_an_object", f"row is {type(obj).__name__}, not a JSON object")
    fmt = detect_format(obj) if fmt == "auto" else fmt
    fmt = "conversations" if fmt == "sharegpt" else fmt
    if fmt == "alpaca":
        messages = _alpaca_messages(obj)
    else:
        if fmt not in obj:
            raise RowError("missing_field", f"row has no '{fmt}' field")
        messages = _message_list(obj[fmt], fmt)
        system = obj.get("system")
        # LLaMA-Factory's ShareGPT layout keeps the system prompt in a column of its own.
        if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
    messages = [m for m in messages if not (m["role"] == "system" and not m["content"].strip())]
    if not messages:
        raise RowError("empty_conversation", "no messages")
    for i, m in enumerate(messages, 1):
        if not m["content"].strip() and not m.get("tool_calls"):
            raise RowError("empty_content", f"message {i} ({m['role']}) is empty")
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last_reply is None:
        raise RowError("no_assistant_turn", "no assistant/gpt message to learn from")
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if first_reply < first_user:
        raise RowError("no_user_turn", f"assistant message {first_reply + 1} comes before any user message")
    out = Conversation(messages[: last_reply + 1])
    out.tools = _tools(obj)
    return out


# ----- reading sources -----------------------------------------------------------------------------------

def read_conversations(path, fmt: str = "auto", *, split: str | None = None,
                       columns: dict | None = None) -> tuple[list[Conversation], list[BadRow], int]:
    """All rows of one source: (normalised conversations, bad rows, rows read). Bad rows never stop the scan."""
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    good, bad, n = [], [], 0
    for source in source_files(path, split):
        for position, obj in source.rows:
            n += 1
            try:
                if isinstance(obj, RowError):
                    raise obj
                good.append(normalize_row(rename_columns(obj, columns), fmt))
            except RowError as e:
                bad.append(BadRow(source.name, position, e.reason, e.detail, source.unit))
    return good, bad, n


def format_bad_rows(bad: list[BadRow], limit: int = MAX_LISTED_BAD_ROWS) -> str:
    lines = [f"  {b}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    by_reason = Counter(b.reason for b in bad)
    lines.append("  by reason: " + ", ".join(f"{r} {c}" for r, c in sorted(by_reason.items())))
    return "\n".join(lines)


# ----- tokenisation --------------------------------------------------------------------------------------

def _render(tokenizer, messages, add_generation_prompt=False, tools=None) -> str:
    return tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _check_template_renders_tools(tokenizer, messages, full: str, tools):
    """Refuse a template that would drop tool schemas or tool calls: their tokens would silently vanish."""
    if tools and full == _render(tokenizer, messages):
        raise DataError("the tokenizer's chat template ignores 'tools' (the function schemas of a row); use a "
                        "template that renders them (Qwen2.5, Qwen3, Llama 3.1 do) or drop the column")
    if any(m.get("tool_calls") for m in messages):
        plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if full == _render(tokenizer, plain, tools=tools):
            raise DataError("the tokenizer's chat template does not render assistant tool_calls (ShareGPT "
                            "function_call turns); use a template that does (Qwen2.5, Qwen3, Llama 3.1)")


def render_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The chat-template text of `messages` cut into (text, is_reply) pieces that concatenate to the whole.

    A reply piece is what a model must generate after the template's generation
    prompt: the assistant content (tool calls included) plus the end-of-turn marker
    (`<|im_end|>` for ChatML), without the whitespace the template puts after it;
    tool results are prompt. Pieces come from
    rendering prefixes of the conversation, so no template-specific parsing.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    tools = getattr(messages, "tools", None)
    full = _render(tokenizer, messages, tools=tools)
    if tools or any(m.get("tool_calls") for m in messages):
        _check_template_renders_tools(tokenizer, messages, full, tools)
    pieces, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        through = _render(tokenizer, messages[: i + 1], tools=tools)
        if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= pos):
            raise DataError("the chat template does not render a conversation as an extension of its prefixes; "
                            "assistant spans cannot be located")
        reply = through[len(prompt):].rstrip()
        pieces += [(full[pos:len(prompt)], False), (reply, True)]
        pos = len(prompt) + len(reply)
    pieces.append((full[pos:], False))
    return [(text, is_reply) for text, is_reply in pieces if text]


def _assemble(piece_ids: list[list[int]], piece_is_reply: list[bool], max_length: int) -> dict:
    input_ids, labels = [], []
    for ids, is_reply in zip(piece_ids, piece_is_reply):
        input_ids += ids
        labels += ids if is_reply else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length], "truncated": truncated,
            "full_length": len(input_ids)}


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict:
    """input_ids, labels (-100 outside assistant replies) and truncated for one conversation.

    Each piece is tokenised on its own, exactly as at inference time: the prompt
    (ending in the generation prompt) is encoded, then the reply follows. Longer
    sequences are cut on the right to max_length.
    """
    pieces = render_segments(tokenizer, messages)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in pieces]
    out = _assemble(ids, [r for _, r in pieces], max_length)
    out.pop("full_length")
    return out


# ----- datasets ------------------------------------------------------------------------------------------

@dataclass
class DataStats:
    """What load_stage_dataset kept and dropped; files maps each path to read / bad / used / rows counts."""

    num_rows: int = 0
    num_tokens: int = 0
    num_label_tokens: int = 0
    num_truncated: int = 0
    num_dropped_no_labels: int = 0   # truncation left none of the reply: nothing to learn, so dropped
    max_length: int = 0
    longest_sequence: int = 0        # before truncation
    bad_rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def combine(cls, parts: list["DataStats"]) -> "DataStats":
        """The stats of a stage tokenized in slices: counts summed, the longest sequence maxed.
        What reading found (bad rows, read/used per file) is the same in every part."""
        first = parts[0]
        out = cls(max_length=first.max_length, bad_rows=dict(first.bad_rows),
                  files={path: {**counts, "rows": 0} for path, counts in first.files.items()})
        for part in parts:
            for name in ("num_rows", "num_tokens", "num_label_tokens", "num_truncated", "num_dropped_no_labels"):
                setattr(out, name, getattr(out, name) + getattr(part, name))
            out.longest_sequence = max(out.longest_sequence, part.longest_sequence)
            for path, counts in part.files.items():
                out.files[path]["rows"] += counts["rows"]
        return out


SOURCE_KEYS = ("path", "format", "max_samples", "split", "columns", "weight")


def _check_source(source) -> dict:
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        source = {"path": str(source)}
    if not isinstance(source, dict) or not source.get("path"):
        raise DataError(f"data source {source!r} needs a 'path'")
    unknown = set(source) - set(SOURCE_KEYS)
    if unknown:
        raise DataError(f"data source {source['path']}: unknown keys {sorted(unknown)} (known: {', '.join(SOURCE_KEYS)})")
    fmt = source.get("format") or "auto"
    if fmt not in FORMATS:
        raise DataError(f"data source {source['path']}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    max_samples = source.get("max_samples")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise DataError(f"data source {source['path']}: max_samples must be a positive integer or null")
    columns = source.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise DataError(f"data source {source['path']}: columns must map field names to column names")
    weight = source.get("weight", 1.0)
    weight = 1.0 if weight is None else weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise DataError(f"data source {source['path']}: weight must be a positive number, not {weight!r}")
    split = source.get("split")
    if split is not None and not isinstance(split, str):
        raise DataError(f"data source {source['path']}: split must be a string")
    return {"path": str(source["path"]), "format": fmt, "max_samples": max_samples, "split": split,
            "columns": dict(columns), "weight": float(weight)}


def source_name(source: dict) -> str:
    """How a checked source is named in stats and messages: its path, and its split if it names one."""
    return source["path"] + (f"[{source['split']}]" if source["split"] else "")


def _weighted(rows: list, weight: float, rng: random.Random) -> list:
    """`weight` times the rows of a source: whole copies, plus a seeded share of one more (file order kept)."""
    copies = int(weight)
    extra = round((weight - copies) * len(rows))
    return rows * copies + [rows[i] for i in sorted(rng.sample(range(len(rows)), extra))]


def _warn_if_pieces_differ(tokenizer, pieces, piece_ids):
    # Byte-level BPE with special-token turn markers (Qwen, ChatML) encodes the pieces exactly as the whole
    # text; a tokenizer that prefixes spaces per call (SentencePiece) would not, and that is worth knowing.
    whole = tokenizer("".join(text for text, _ in pieces), add_special_tokens=False)["input_ids"]
    if whole != [t for ids in piece_ids for t in ids]:
        log.warning("this tokenizer encodes prompt and reply pieces differently from the whole rendered "
                    "conversation; training follows the inference-time split (prompt, then reply)")


def read_stage_conversations(sources, max_length: int, on_bad_row: str = "error", seed: int = 0):
    """([(path, messages)], DataStats so far) of a stage's sources, in source order; bad rows per on_bad_row.

    sources: [{"path", "format", "max_samples", "split", "columns", "weight"}] (SOURCE_KEYS; a bare path
    stands for {"path": path}). on_bad_row="error" raises a DataError listing every bad row (file, line,
    reason) of every source; "skip" drops them and counts them by reason. max_samples keeps a seeded
    random subset of a source's valid rows, in file order; weight then repeats the source (2.0: every row
    twice) or keeps a seeded share of it (0.5: half), so sources mix in the ratios given.
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, not {max_length}")
    sources = [_check_source(s) for s in sources]
    if not sources:
        raise DataError("no data sources given")
    stats = DataStats(max_length=max_length)
    conversations, all_bad = [], []
    for index, source in enumerate(sources):
        good, bad, n_read = read_conversations(source["path"], source["format"], split=source["split"],
                                               columns=source["columns"])
        all_bad += bad
        rng = random.Random(f"{seed}:{index}:{source['path']}")
        if source["max_samples"] is not None and len(good) > source["max_samples"]:
            good = [good[i] for i in sorted(rng.sample(range(len(good)), source["max_samples"]))]
        if source["weight"] != 1.0 and good:
            good = _weighted(good, source["weight"], rng)
        name = source_name(source)
        stats.files[name] = {"read": n_read, "bad": len(bad), "used": len(good), "rows": 0,
                             "weight": source["weight"]}
        conversations += [(name, m) for m in good]
    if any(s["weight"] != 1.0 for s in sources):
        log.info("data mix: %s", ", ".join(f"{n} x{c['weight']:g} -> {c['used']} rows"
                                           for n, c in stats.files.items()))
    stats.bad_rows = dict(sorted(Counter(b.reason for b in all_bad).items()))
    if not conversations and not all_bad:
        raise DataError(f"{', '.join(str(s['path']) for s in sources)}: no rows (an empty file?)")
    if all_bad:
        if on_bad_row == "error":
            raise DataError(f"{all_bad[0]} ({len(all_bad)} bad rows in the training data; on_bad_row=error, set "
                            f"on_bad_row=skip to drop them):\n{format_bad_rows(all_bad)}")
        log.warning("skipped %d bad rows:\n%s", len(all_bad), format_bad_rows(all_bad, limit=5))
    return conversations, stats


def tokenize_conversations(conversations, tokenizer, stats: DataStats, batch_size: int = 1024,
                           progress: bool = True):
    """datasets.Dataset of input_ids / labels for `conversations` (in order), counting into `stats`.

    Rows whose reply starts beyond stats.max_length are dropped (nothing to learn). Any contiguous
    slice of a stage's conversations can be tokenized apart and the pieces concatenated in order.
    """
    from tqdm import tqdm

    max_length = stats.max_length
    columns = {"input_ids": [], "labels": []}
    bar = tqdm(total=len(conversations), desc="tokenizing", unit="row", dynamic_ncols=True,
               disable=not progress or len(conversations) < 20 * batch_size)
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        rendered = [render_segments(tokenizer, messages) for _, messages in chunk]
        # One batched call: the Rust tokenizer encodes the pieces of a whole chunk in parallel.
        flat = [text for pieces in rendered for text, _ in pieces]
        flat_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        k = 0
        for (path, _), pieces in zip(chunk, rendered):
            ids, k = flat_ids[k:k + len(pieces)], k + len(pieces)
            if start == 0 and k == len(pieces):
                _warn_if_pieces_differ(tokenizer, pieces, ids)
            row = _assemble(ids, [r for _, r in pieces], max_length)
            stats.longest_sequence = max(stats.longest_sequence, row["full_length"])
            n_labels = sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX)  # position 0 is never predicted
            if n_labels == 0:
                stats.num_dropped_no_labels += 1
                continue
            stats.num_truncated += row["truncated"]
            stats.num_tokens += len(row["input_ids"])
            stats.num_label_tokens += n_labels
            stats.files[path]["rows"] += 1
            columns["input_ids"].append(row["input_ids"])
            columns["labels"].append(row["labels"])
        bar.update(len(chunk))
    bar.close()
    stats.num_rows += len(columns["input_ids"])

    import datasets

    return datasets.Dataset.from_dict(columns, features=datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32"))}))


def check_usable(stats: DataStats, sources):
    """Warn about rows dropped for length; refuse a stage left without a single usable row."""
    if stats.num_dropped_no_labels:
        log.warning("dropped %d rows whose reply starts beyond max_length=%d", stats.num_dropped_no_labels,
                    stats.max_length)
    if stats.num_rows == 0:
        paths = ", ".join(str(s["path"] if isinstance(s, dict) else s) for s in sources)
        raise DataError(f"no usable training rows in {paths} (bad rows: {stats.bad_rows or 'none'}; "
                        f"dropped for length: {stats.num_dropped_no_labels})")


def load_stage_dataset(sources, tokenizer, max_length: int, on_bad_row: str = "error", seed: int = 0,
                       batch_size: int = 1024):
    """(datasets.Dataset of input_ids / labels, DataStats) for a stage's sources, in one process."""
    conversations, stats = read_stage_conversations(sources, max_length, on_bad_row, seed)
    dataset = tokenize_conversations(conversations, tokenizer, stats, batch_size)
    check_usable(stats, sources)
    return dataset, stats


def collate(batch: list[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-padded int64 tensors input_ids, attention_mask, labels (labels padded with -100)."""
    import torch

    length = max(len(row["input_ids"]) for row in batch)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----- command line --------------------------------------------------------------------------------------

def _check(files, fmt: str, tokenizer_dir: str | None, max_length: int, split: str | None = None,
           columns: dict | None = None) -> int:
    tokenizer = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    total_read = total_good = 0
    all_bad: list[BadRow] = []
    failed_files = 0
    for path in files:
        try:
            good, bad, n_read = read_conversations(path, fmt, split=split, columns=columns)
        except DataError as e:
            print(f"{e}", flush=True)
            failed_files += 1
            continue
        for b in bad:
            print(b)
        total_read, total_good, all_bad = total_read + n_read, total_good + len(good), all_bad + bad
        line = f"{path}: {n_read} rows, {len(good)} valid, {len(bad)} bad"
        if tokenizer is not None and good:
            lengths = [len(tokenize_conversation(tokenizer, m, 1 << 30)["input_ids"]) for m in good]
            over = sum(n > max_length for n in lengths)
            line += (f"; tokens mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}, "
                     f"{over} longer than {max_length}")
        print(line)
    summary = f"summary: {len(files)} files, {total_read} rows, {total_good} valid, {len(all_bad)} bad"
    if all_bad:
        summary += " (" + ", ".join(f"{r} {c}" for r, c in sorted(Counter(b.reason for b in all_bad).items())) + ")"
    if failed_files:
        summary += f", {failed_files} unreadable files"
    print(summary)
    return 1 if all_bad or failed_files else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medcare_dist.data",
                                     description="Training-data tools of medcare-dist.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate data files without training; exit status 1 if any row is bad",
                           description="List every bad row as FILE:LINE: reason: detail, then a summary. "
                                       "Exit status 0 if all files are clean, 1 otherwise.")
    check.add_argument("files", nargs="+", metavar="SOURCE",
                       help="a .jsonl/.json/.parquet/.arrow/.csv file, a folder of them, or a save_to_disk folder")
    check.add_argument("--format", default="auto", choices=FORMATS)
    check.add_argument("--split", default=None, help="the split of a save_to_disk DatasetDict")
    check.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                       help="read our FIELD (messages, conversations, instruction, input, output, system, tools) "
                            "from the source's COLUMN; repeatable")
    check.add_argument("--tokenizer", default=None, help="local tokenizer directory: also report token lengths")
    check.add_argument("--max-length", type=int, default=2048, help="length to count overlong rows against")
    args = parser.parse_args(argv)
    columns = {}
    for spec in args.column:
        ours, sep, theirs = spec.partition("=")
        if not sep or not ours or not theirs:
            parser.error(f"--column {spec!r}: expected FIELD=COLUMN")
        columns[ours] = theirs
    return _check(args.files, args.format, args.tokenizer, args.max_length, args.split, columns)
