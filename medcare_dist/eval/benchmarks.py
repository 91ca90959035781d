"""Benchmark files in the common medical formats -> `Item`s.

Reads multiple-choice files (MedQA, MedMCQA, CMB, CMExam, C-Eval/CMMLU-style
JSON or JSONL), extraction/normalisation items (CBLUE-like: predicted vs gold
item sets) and free-text items, including the embedded demo's held-out
splits; a row that cannot be read raises `BenchmarkError` naming file, line
and field. See docs/evaluation.md for the exact rules.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from medcare_dist.data.sources import DataError, RowError, source_files
from medcare_dist.errors import InputError

log = logging.getLogger("medcare_dist.eval.benchmarks")

KINDS = ("mcq", "exact", "set", "text")

QUESTION_FIELDS = ("question", "Question", "query", "Query", "stem", "题干", "问题", "题目")
OPTION_FIELDS = ("options", "Options", "choices", "Choices", "option", "Option", "选项")
MCQ_ANSWER_FIELDS = ("answer_idx", "answer_letter", "answer", "Answer", "answers", "label", "cop", "gold",
                     "correct_answer", "target", "答案")
GOLD_FIELDS = ("gold", "answer", "Answer", "answers", "output", "reference", "target", "label",
               "normalized_result", "答案")
TYPE_FIELDS = ("question_type", "type", "choice_type", "qtype", "task", "题型")
ID_FIELDS = ("id", "qid", "question_id", "_id", "uid")
MEDMCQA_OPTION_FIELDS = ("opa", "opb", "opc", "opd", "ope")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# A question type that says more than one option is right (CMB "多项选择题", "多选题", "multi-answer" ...).
# MedMCQA's choice_type "multi" is not one: it marks multi-statement stems with one right option.
MULTI_TYPE = re.compile(r"多选|多项|不定项|多个正确|multi[-_ ]?(?:answer|select|response)|multiple[-_ ]?(?:answer|select|response)",
                        re.I)
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

INSTRUCTIONS = {
    ("en", False): 'Answer with the letter of the correct option, in the form "The answer is X".',
    ("en", True): 'More than one option may be correct. Answer with the letters of all correct options, '
                  'in the form "The answer is XY".',
    ("zh", False): "请选出正确答案，并以“答案为X”的格式作答。",
    ("zh", True): "本题可能有多个正确选项，请选出全部正确答案，并以“答案为XY”的格式作答。",
}


class BenchmarkError(InputError, ValueError):
    """A benchmark file or row that cannot be read; the message names file, line and field."""


# ----- items ------------------------------------------------------------------------------------------------

@dataclass
class Item:
    file: str                    # display name of the benchmark file
    line: int                    # 1-based line of the row in its file
    kind: str                    # "mcq" | "exact" | "set" | "text"
    type: str                    # group label in the results (question type, task, or derived)
    messages: list               # the prompt turns (no final assistant turn)
    gold: object                 # mcq: sorted letters; exact/text: str; set: sorted normalised items
    options: list | None = None  # mcq: [(letter, text), ...]
    multi: bool = False          # mcq: more than one option may be right
    extractor: str = "plain"     # how an answer is read out of generated text
    lang: str = "en"
    id: str | None = None
    index: int = -1              # position over all files, set when files are combined
    reply: str | None = None     # exact/text/set: the reference answer as a model would write it (few-shot)
    origin: str = ""             # the file (inside a folder source) and line the row came from
    fewshot: list = field(default_factory=list)  # origins of the solved examples put before the prompt


def _where(path, line, field=None, unit="line"):
    """file:line, or "file: row N" for tables, and the field if one is named."""
    return (f"{path}:{line}" if unit == "line" else f"{path}: {unit} {line}") + (f": field {field!r}" if field else "")


def _first(row: dict, names):
    for name in names:
        if name in row and row[name] is not None and row[name] != "":
            return name, row[name]
    return None, None


def lang_of(text: str) -> str:
    return "zh" if CJK.search(text or "") else "en"


def _json_rows(path: Path):
    """(line, row) of a JSONL file or a JSON file holding a list (or a dict with one list of rows)."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if not stripped:
        return []
    if path.suffix.lower() != ".jsonl":
        if stripped[0] == "[":
            return _scan_array(path, text, len(text) - len(stripped))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if not (stripped[0] == "{" and e.msg == "Extra data"):  # otherwise: JSON lines in a .json file
                raise BenchmarkError(f"{_where(path, e.lineno)}: invalid JSON: {e.msg}") from None
        else:
            return _unwrap(path, text, data)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{_where(path, n)}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows


def _unwrap(path: Path, text: str, data):
    if isinstance(data, dict):
        lists = [(k, v) for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(lists) == 1:
            key, rows = lists[0]
            start = text.find(json.dumps(key, ensure_ascii=False))
            first_line = text.count("\n", 0, max(start, 0)) + 1
            return [(first_line, r) for r in rows]  # rows of a wrapped list carry the list's line
        if data and all(isinstance(v, dict) for v in data.values()):  # {"id": {row}, ...}
            return [(1, {"id": k, **v}) for k, v in data.items()]
        if any(f in data for f in QUESTION_FIELDS + OPTION_FIELDS + ("messages", "instruction")):
            return [(1, data)]  # a single row
    raise BenchmarkError(f"{path}: expected JSON lines, a JSON list of rows, or a dict holding one list of rows")


def _scan_array(path: Path, text: str, offset: int):
    """The elements of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    rows, pos = [], offset + 1
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text):
            raise BenchmarkError(f"{_where(path, text.count(chr(10), 0, pos) + 1)}: unterminated JSON list")
        if text[pos] == "]":
            return rows
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{_where(path, e.lineno)}: invalid JSON: {e.msg}") from None
        rows.append((line, obj))


def _prompt_messages(row: dict):
    """(prompt turns, final assistant reply or None) of a messages / conversations / alpaca row, else (None, None)."""
    if isinstance(row.get("messages"), list):
        turns = [{"role": m.get("role"), "content": m.get("content")} for m in row["messages"] if isinstance(m, dict)]
    elif isinstance(row.get("conversations"), list):
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        turns = [{"role": roles.get(m.get("from"), m.get("from")), "content": m.get("value")}
                 for m in row["conversations"] if isinstance(m, dict)]
    elif isinstance(row.get("instruction"), str):
        content = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": content}], row.get("output")
    else:
        return None, None
    reply = None
    if turns and turns[-1]["role"] == "assistant":
        reply = turns[-1]["content"]
        turns = turns[:-1]
    return turns, reply


def parse_options(value, where: str):
    """[(letter, text), ...] from a dict, a list, or an "A. ...\\nB. ..." string; empty options dropped."""
    def clean(text):
        return str(text).strip()

    opts = []
    if isinstance(value, dict):
        keys = list(value)
        if all(isinstance(k, str) and len(k.strip().rstrip(".")) == 1 and k.strip().upper()[0] in LETTERS
               for k in keys):
            opts = sorted((k.strip().upper()[0], clean(v)) for k, v in value.items())
        else:
            opts = [(LETTERS[i], clean(v)) for i, v in enumerate(value.values())]
    elif isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                _, letter = _first(v, ("label", "key", "letter", "id"))
                _, text = _first(v, ("text", "value", "content", "option"))
                if text is None:
                    raise BenchmarkError(f"{where}: option {i} has no text/value field")
                opts.append((str(letter).strip().upper() if letter is not None else LETTERS[i], clean(text)))
        else:
            texts = [clean(v) for v in value]
            lettered = [re.match(r"^\(?([A-Z])[\.\)、:：．]\s*(.*)$", t, re.S) for t in texts]
            if texts and all(lettered) and [m.group(1) for m in lettered] == list(LETTERS[:len(texts)]):
                opts = [(m.group(1), m.group(2).strip()) for m in lettered]
            else:
                opts = [(LETTERS[i], t) for i, t in enumerate(texts)]
    elif isinstance(value, str):
        # One option per line ("A. text", "A text", "(A) text"), else inline "A. text B. text".
        lines = [m for m in (re.match(r"^\s*\(?([A-Z])[\.\)、:：．\s]\s*(.*)$", l)
                             for l in value.strip().splitlines() if l.strip())]
        found = [(m.group(1), m.group(2).strip()) for m in lines if m] if all(lines) else []
        if len(found) < 2 or [l for l, _ in found] != list(LETTERS[:len(found)]):
            parts = re.split(r"(?:^|(?<=\s))\(?([A-Z])[\.\)、:：．]\s*", value.strip())
            found = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
            if parts[0].strip() or len(found) < 2 or [l for l, _ in found] != list(LETTERS[:len(found)]):
                found = []
        opts = found
        if not opts:
            raise BenchmarkError(f"{where}: cannot split options {value[:60]!r} into lettered lines ('A. ...')")
    else:
        raise BenchmarkError(f"{where}: options must be a dict, a list or a string, got {type(value).__name__}")
    opts = [(l, t) for l, t in opts if t]
    if len({l for l, _ in opts}) != len(opts):
        raise BenchmarkError(f"{where}: repeated option letters {[l for l, _ in opts]}")
    if len(opts) < 2:
        raise BenchmarkError(f"{where}: fewer than two non-empty options")
    return opts


def _answer_letters(value, options, where: str, index_base: int | None):
    """The set of gold letters; ints are option indices (0- or 1-based per `index_base`)."""
    letters = [l for l, _ in options]
    if isinstance(value, bool):
        raise BenchmarkError(f"{where}: answer {value!r} is a boolean")
    if isinstance(value, int):
        i = value - (index_base or 0)
        if not 0 <= i < len(options):
            raise BenchmarkError(f"{where}: answer index {value} out of range for {len(options)} options "
                                 f"({index_base or 0}-based)")
        return {letters[i]}
    if isinstance(value, list):
        out = set()
        for v in value:
            out |= _answer_letters(v, options, where, index_base)
        if not out:
            raise BenchmarkError(f"{where}: empty answer list")
        return out
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: cannot read an answer from a {type(value).__name__}")
    s = value.strip()
    if len(s) > 1:  # the text of an option ("answer": "Aspirin" in MedQA) before letter runs such as "ACE"
        for l, t in options:
            if s.casefold() == t.casefold():
                return {l}
    tokens = [t for t in re.split(r"[\s,，、;；/&]+", s.strip("()（）.。 ")) if t]
    if tokens and all(re.fullmatch(r"[A-Z]+|[a-z]", t) for t in tokens):
        found = set("".join(tokens).upper())
        if found <= set(letters):
            return found
    if re.fullmatch(r"\d+", s):
        return _answer_letters(int(s), options, where, index_base)
    raise BenchmarkError(f"{where}: answer {value!r} is neither option letter(s) among {''.join(letters)} "
                         "nor the text of an option")


def _mcq_prompt(question: str, options, multi: bool, lang: str, instruction: str | None):
    lines = [question.strip(), *(f"{l}. {t}" for l, t in options)]
    text = INSTRUCTIONS[(lang, multi)] if instruction is None else instruction
    if text:
        lines.append(text)
    return [{"role": "user", "content": "\n".join(lines)}]


def norm_text(s: str) -> str:
    s = re.sub(r"\s+", " ", str(s).casefold()).strip()
    return s.strip(" .。!！?？;；,，:：\"'“”‘’()（）[]【】")


def norm_set_item(x) -> str:
    """Canonical string of an extraction item (a phrase, or a dict such as {"entity": .., "type": ..})."""
    if isinstance(x, dict):
        return json.dumps({str(k): norm_text(v) for k, v in x.items()}, ensure_ascii=False, sort_keys=True)
    return norm_text(x)


def _gold_set(value, where):
    if isinstance(value, str):
        parts = [p for p in re.split(r"##|\n", value) if p.strip()]
    elif isinstance(value, list):
        parts = value
    else:
        raise BenchmarkError(f"{where}: an extraction gold must be a list (or a '##'-joined string), "
                             f"got {type(value).__name__}")
    items = {norm_set_item(p) for p in parts}
    items.discard("")
    return sorted(items)


def parse_row(row, path, line: int, *, kind: str | None = None, index_base: int | None = None,
              instruction: str | None = None, unit: str = "line", class_labels: dict | None = None) -> Item:
    """One benchmark row as an Item; BenchmarkError naming file, line (or row) and field when it cannot be read.

    class_labels: {column: names} of the file's ClassLabel columns; an integer answer in one of them is a
    0-based index (what `datasets` stores), and -1 marks an unlabelled row."""
    def at(name=None):
        return _where(path, line, name, unit)

    where = at()
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    turns, reply = _prompt_messages(row)
    _, rid = _first(row, ID_FIELDS)
    type_field, type_value = _first(row, TYPE_FIELDS)
    label = str(type_value) if type_value is not None else None
    kind = kind or row.get("kind")
    if kind is not None and kind not in KINDS:
        raise BenchmarkError(f"{at('kind')}: unknown kind {kind!r}, expected one of {KINDS}")

    opt_field, opt_value = _first(row, OPTION_FIELDS)
    if opt_value is None and all(k in row for k in MEDMCQA_OPTION_FIELDS[:2]):  # MedMCQA opa..opd
        opt_field, opt_value = "opa..", [row[k] for k in MEDMCQA_OPTION_FIELDS if row.get(k) not in (None, "")]
    if opt_value is None and all(k in row for k in "AB"):  # C-Eval / CMMLU: options as top-level A, B, ...
        opt_field, opt_value = "A..", {k: row[k] for k in LETTERS if k in row and isinstance(row[k], str)}
    if opt_value is not None and kind in (None, "mcq"):
        options = parse_options(opt_value, at(opt_field))
        ans_field, ans_value = _first(row, MCQ_ANSWER_FIELDS)
        if ans_value is None:
            raise BenchmarkError(f"{where}: no answer field (looked for {', '.join(MCQ_ANSWER_FIELDS)})")
        base = index_base
        if class_labels and ans_field in class_labels:
            base = 0
            if isinstance(ans_value, int) and ans_value < 0:
                raise BenchmarkError(f"{at(ans_field)}: answer {ans_value} marks an unlabelled row (a test split "
                                     "published without answers?)")
        gold = _answer_letters(ans_value, options, at(ans_field), base)
        multi = len(gold) > 1 or bool(label and MULTI_TYPE.search(label))
        if turns:
            messages = turns
            lang = lang_of(" ".join(str(m["content"]) for m in turns))
        else:
            q_field, question = _first(row, QUESTION_FIELDS)
            if question is None:
                raise BenchmarkError(f"{where}: no question field (looked for {', '.join(QUESTION_FIELDS)})")
            if not isinstance(question, str):
                raise BenchmarkError(f"{at(q_field)}: question must be a string")
            lang = lang_of(question + "".join(t for _, t in options))
            messages = _mcq_prompt(question, options, multi, lang, instruction)
        return Item(str(path), line, "mcq", label or ("mcq-multi" if multi else "mcq-single"), messages,
                    sorted(gold), options=options, multi=multi, extractor="mcq", lang=lang, id=rid)
    if kind == "mcq":
        raise BenchmarkError(f"{where}: kind mcq but no options field (looked for {', '.join(OPTION_FIELDS)})")

    # Generation items: a prompt and a gold answer.
    if not turns:
        q_field, question = _first(row, QUESTION_FIELDS + ("input", "prompt", "text"))
        if question is None:
            raise BenchmarkError(f"{where}: no prompt (messages, conversations, instruction, or one of "
                                 f"{', '.join(QUESTION_FIELDS)}, input, prompt, text)")
        if not isinstance(question, str):
            raise BenchmarkError(f"{at(q_field)}: the prompt must be a string")
        turns = [{"role": "user", "content": question}]
    for i, m in enumerate(turns):
        if not isinstance(m["content"], str) or m["role"] not in ("system", "user", "assistant"):
            raise BenchmarkError(f"{at('messages')}: turn {i} needs a role "
                                 "(system/user/assistant) and string content")
    gold_field, gold = _first(row, GOLD_FIELDS)
    if gold is None:
        gold_field, gold = "messages", reply
    if gold is None:
        raise BenchmarkError(f"{where}: no gold answer (looked for {', '.join(GOLD_FIELDS)} or a final "
                             "assistant turn)")
    gwhere = at(gold_field)
    raw_gold = gold
    task = row.get("task")
    lang = lang_of(" ".join(m["content"] for m in turns))
    extractor = "plain"
    if kind is None:
        if task == "desc_to_code":
            kind, extractor = "exact", "icd_code"
        elif task == "code_to_desc":
            kind, extractor = "text", "code_desc"
        elif isinstance(gold, dict) and isinstance(gold.get("code"), str):
            kind, extractor = "exact", "stage2_code"      # demo cdn: {"code", "term"} answers, scored on the code
        elif isinstance(gold, list) or (isinstance(gold, str) and "##" in gold):
            kind = "set"
        else:
            kind = "text"
    if kind == "set":
        extractor, gold = "set", _gold_set(gold, gwhere)
    elif extractor == "stage2_code":
        gold = gold["code"]
    elif isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    elif not isinstance(gold, str):
        raise BenchmarkError(f"{gwhere}: a {kind} gold answer must be a string, got {type(gold).__name__}")
    written = reply if isinstance(reply, str) else raw_gold if isinstance(raw_gold, str) else None
    return Item(str(path), line, kind, label or kind, turns, gold, extractor=extractor, lang=lang, id=rid,
                reply=written)


def _detect_index_base(rows, path) -> int:
    """0 or 1 for integer answers without ClassLabel metadata (docs/evaluation.md, "Answer indices").

    MedMCQA-shaped rows (opa..opd and an integer cop) are 1-based, as in the original release, unless a cop
    of 0 shows a 0-based export (the Hub's files declare cop a ClassLabel, which parse_row reads 0-based).
    Other files: 0-based if any answer is 0, 1-based if any equals its option count, else 0-based with a
    warning."""
    values, sizes, medmcqa = [], [], True
    for _, row in rows:
        if not isinstance(row, dict):
            continue
        answer_field, v = _first(row, MCQ_ANSWER_FIELDS)
        if isinstance(v, int) and not isinstance(v, bool):
            values.append(v)
            _, opts = _first(row, OPTION_FIELDS)
            n = len(opts) if isinstance(opts, (list, dict)) else sum(
                1 for k in MEDMCQA_OPTION_FIELDS if row.get(k) not in (None, ""))
            sizes.append(n)
            medmcqa = medmcqa and answer_field == "cop" and all(k in row for k in MEDMCQA_OPTION_FIELDS[:4])
    if not values or 0 in values:
        return 0
    if medmcqa:
        if not any(v == n for v, n in zip(values, sizes)):
            log.warning("%s: MedMCQA-shaped rows, cop never 0: reading cop as 1-based (the original release); "
                        "pass --index-base 0 if this is a 0-based export", path)
        return 1
    if any(v == n for v, n in zip(values, sizes)):
        return 1
    log.warning("%s: integer answers never reach 0 or the option count; assuming 0-based indices "
                "(pass --index-base 1 if they are 1-based)", path)
    return 0


def _source_rows(path: Path, split: str | None):
    """[(name, unit, rows, class_labels)] of a benchmark source: a JSON file as before, anything else (tables,
    folders, save_to_disk datasets) through data.sources."""
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl") and split is None:
        return [(str(path), "line", _json_rows(path), {})]
    out = []
    try:
        for source in source_files(path, split):
            rows = []
            for position, row in source.rows:
                if isinstance(row, RowError):
                    raise BenchmarkError(f"{_where(source.name, position, unit=source.unit)}: {row.reason}: "
                                         f"{row.detail}")
                rows.append((position, row))
            labels = {k: f["names"] for k, f in (source.features or {}).items()
                      if isinstance(f, dict) and f.get("_type") == "ClassLabel"}
            out.append((source.name, source.unit, rows, labels))
    except DataError as e:
        raise BenchmarkError(str(e)) from None
    return out


def load_benchmark(path, *, kind=None, index_base="auto", instruction=None, on_bad_row="error",
                   name: str | None = None, split: str | None = None):
    """(items, skipped) of one benchmark: a json/jsonl/parquet/arrow/csv file, a folder of them, or a
    save_to_disk dataset (`split` for a DatasetDict); skipped lists (line, message) when on_bad_row="skip"."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: no such file or folder")
    items, skipped = [], []
    for file, unit, rows, labels in _source_rows(path, split):
        base = _detect_index_base(rows, file) if index_base == "auto" else int(index_base)
        for line, row in rows:
            try:
                item = parse_row(row, file, line, kind=kind, index_base=base, instruction=instruction, unit=unit,
                                 class_labels=labels)
            except BenchmarkError as e:
                if on_bad_row != "skip":
                    raise
                skipped.append((line, str(e)))
                continue
            item.origin = _where(file, line, unit=unit)
            item.file = name or str(path) + (f"[{split}]" if split else "")
            items.append(item)
    if not items:
        raise BenchmarkError(f"{path}: no readable rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return items, skipped


def load_all(files, *, kind=None, index_base="auto", instruction=None, on_bad_row="error", limit=None,
             sample_seed=0, split=None, totals: dict | None = None):
    """(items, skipped) of several benchmarks; `totals`, if given, receives each benchmark's item count
    before the seeded `limit` sample."""
    items, skipped = [], {}
    for f in files:
        its, sk = load_benchmark(f, kind=kind, index_base=index_base, instruction=instruction,
                                 on_bad_row=on_bad_row, split=split)
        if totals is not None and its:
            totals[its[0].file] = len(its)
        if limit is not None and len(its) > limit:
            its = sorted(random.Random(sample_seed).sample(its, limit), key=lambda it: it.line)
        items += its
        if sk:
            skipped[str(f)] = sk
    for i, it in enumerate(items):
        it.index = i
    return items, skipped
