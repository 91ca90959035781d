"""Benchmark evaluation of a trained (or any) causal LM: `python -m medcare_dist.eval`.

Reads multiple-choice files in the common medical formats (MedQA, MedMCQA,
CMB, CMExam, C-Eval/CMMLU-style JSON or JSONL), extraction/normalisation
items (CBLUE-like: predicted vs gold item sets) and free-text items, and the
embedded demo's held-out splits. Multiple-choice items are scored by option
log-likelihood and/or by generate-then-extract; everything else by generation.
Items are sharded over ranks when launched with several (torchrun, deepspeed,
mpirun) and gathered on rank 0, which writes `results.json`, `results.md` and
`items.jsonl`. See docs/evaluation.md for the exact rules.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("medcare_dist.eval")

KINDS = ("mcq", "exact", "set", "text")
SCORERS = ("loglik", "generate", "both")
IM_END = "<|im_end|>"

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

DEFAULT_MAX_NEW_TOKENS = {"mcq": 32, "exact": 48, "set": 128, "text": 128}
INSTRUCTIONS = {
    ("en", False): 'Answer with the letter of the correct option, in the form "The answer is X".',
    ("en", True): 'More than one option may be correct. Answer with the letters of all correct options, '
                  'in the form "The answer is XY".',
    ("zh", False): "请选出正确答案，并以“答案为X”的格式作答。",
    ("zh", True): "本题可能有多个正确选项，请选出全部正确答案，并以“答案为XY”的格式作答。",
}
ANSWER_PREFIX = {"en": "The answer is ", "zh": "答案为"}


class BenchmarkError(ValueError):
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


def _where(path, line, field=None):
    return f"{path}:{line}" + (f": field {field!r}" if field else "")


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


def _norm_text(s: str) -> str:
    s = re.sub(r"\s+", " ", str(s).casefold()).strip()
    return s.strip(" .。!！?？;；,，:：\"'“”‘’()（）[]【】")


def norm_set_item(x) -> str:
    """Canonical string of an extraction item (a phrase, or a dict such as {"entity": .., "type": ..})."""
    if isinstance(x, dict):
        return json.dumps({str(k): _norm_text(v) for k, v in x.items()}, ensure_ascii=False, sort_keys=True)
    return _norm_text(x)


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
              instruction: str | None = None) -> Item:
    """One benchmark row as an Item; BenchmarkError naming file, line and field when it cannot be read."""
    where = _where(path, line)
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    turns, reply = _prompt_messages(row)
    _, rid = _first(row, ID_FIELDS)
    type_field, type_value = _first(row, TYPE_FIELDS)
    label = str(type_value) if type_value is not None else None
    kind = kind or row.get("kind")
    if kind is not None and kind not in KINDS:
        raise BenchmarkError(f"{_where(path, line, 'kind')}: unknown kind {kind!r}, expected one of {KINDS}")

    opt_field, opt_value = _first(row, OPTION_FIELDS)
    if opt_value is None and all(k in row for k in MEDMCQA_OPTION_FIELDS[:2]):  # MedMCQA opa..opd
        opt_field, opt_value = "opa..", [row[k] for k in MEDMCQA_OPTION_FIELDS if row.get(k) not in (None, "")]
    if opt_value is None and all(k in row for k in "AB"):  # C-Eval / CMMLU: options as top-level A, B, ...
        opt_field, opt_value = "A..", {k: row[k] for k in LETTERS if k in row and isinstance(row[k], str)}
    if opt_value is not None and kind in (None, "mcq"):
        options = parse_options(opt_value, _where(path, line, opt_field))
        ans_field, ans_value = _first(row, MCQ_ANSWER_FIELDS)
        if ans_value is None:
            raise BenchmarkError(f"{where}: no answer field (looked for {', '.join(MCQ_ANSWER_FIELDS)})")
        gold = _answer_letters(ans_value, options, _where(path, line, ans_field), index_base)
        multi = len(gold) > 1 or bool(label and MULTI_TYPE.search(label))
        if turns:
            messages = turns
            lang = lang_of(" ".join(str(m["content"]) for m in turns))
        else:
            q_field, question = _first(row, QUESTION_FIELDS)
            if question is None:
                raise BenchmarkError(f"{where}: no question field (looked for {', '.join(QUESTION_FIELDS)})")
            if not isinstance(question, str):
                raise BenchmarkError(f"{_where(path, line, q_field)}: question must be a string")
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
            raise BenchmarkError(f"{_where(path, line, q_field)}: the prompt must be a string")
        turns = [{"role": "user", "content": question}]
    for i, m in enumerate(turns):
        if not isinstance(m["content"], str) or m["role"] not in ("system", "user", "assistant"):
            raise BenchmarkError(f"{_where(path, line, 'messages')}: turn {i} needs a role "
                                 "(system/user/assistant) and string content")
    gold_field, gold = _first(row, GOLD_FIELDS)
    if gold is None:
        gold_field, gold = "messages", reply
    if gold is None:
        raise BenchmarkError(f"{where}: no gold answer (looked for {', '.join(GOLD_FIELDS)} or a final "
                             "assistant turn)")
    gwhere = _where(path, line, gold_field)
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
    return Item(str(path), line, kind, label or kind, turns, gold, extractor=extractor, lang=lang, id=rid)


def _detect_index_base(rows, path) -> int:
    """0 or 1 for integer answers (MedMCQA "cop": 1-4 in the original release, 0-3 on the HF hub)."""
    values, sizes = [], []
    for _, row in rows:
        if not isinstance(row, dict):
            continue
        _, v = _first(row, MCQ_ANSWER_FIELDS)
        if isinstance(v, int) and not isinstance(v, bool):
            values.append(v)
            _, opts = _first(row, OPTION_FIELDS)
            n = len(opts) if isinstance(opts, (list, dict)) else sum(
                1 for k in MEDMCQA_OPTION_FIELDS if row.get(k) not in (None, ""))
            sizes.append(n)
    if not values or 0 in values:
        return 0
    if any(v == n for v, n in zip(values, sizes)):
        return 1
    log.warning("%s: integer answers never reach 0 or the option count; assuming 0-based indices "
                "(pass --index-base 1 if they are 1-based)", path)
    return 0


def load_benchmark(path, *, kind=None, index_base="auto", instruction=None, on_bad_row="error",
                   name: str | None = None):
    """(items, skipped) of one benchmark file; skipped lists (line, message) when on_bad_row="skip"."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    rows = _json_rows(path)
    base = _detect_index_base(rows, path) if index_base == "auto" else int(index_base)
    items, skipped = [], []
    for line, row in rows:
        try:
            item = parse_row(row, path, line, kind=kind, index_base=base, instruction=instruction)
        except BenchmarkError as e:
            if on_bad_row != "skip":
                raise
            skipped.append((line, str(e)))
            continue
        item.file = name or str(path)
        items.append(item)
    if not items:
        raise BenchmarkError(f"{path}: no readable rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return items, skipped


# ----- answer extraction and scoring (pure functions) -------------------------------------------------------

_CUE = re.compile(r"(?:correct\s+)?answers?\s*(?:is|are|:|：)|(?:正确)?答案\s*(?:应该?)?(?:为|是|选|：|:)|故选|应选|选择?(?=\s*[A-Z])",
                  re.I)


def extract_choice(text: str, letters) -> list | None:
    """Sorted option letters named in `text`, or None when no answer can be read.

    The last answer cue wins ("The answer is A, C", "answers are A and C", "答案为AB", "答案是B", "正确答案：
    A、C", "故选B"); a cue followed by no valid letter does not count. Without a cue, an output that is just
    letters ("B", "(B)", "AC", "A, C") or starts "B." / "B)" is read. Letters are restricted to the item's.
    """
    valid = "".join(sorted(set(letters)))
    if not text:
        return None
    token = rf"[\(（\[【]?[{valid}]+(?![A-Za-z0-9])[\)）\]】]?"
    run = re.compile(rf"\s*[:：]?\s*[\"'“‘*]*\s*({token}(?:\s*(?:,|，|、|/|&|;|；|\band\b|和|及|与|或|\s)\s*{token})*)")
    picked = None
    for cue in _CUE.finditer(text):
        m = run.match(text, cue.end())
        if m:
            picked = m.group(1)
    if picked is None:
        bare = re.fullmatch(rf"\s*({token}(?:\s*(?:,|，|、|/|&|\band\b|和|\s)\s*{token})*)\s*[.。]?\s*", text)
        lead = re.match(rf"\s*[\(（]?([{valid}])(?:[\.\)）、:：．]|\s*$)", text)
        picked = bare.group(1) if bare else (lead.group(1) if lead else None)
    if picked is None:
        return None
    found = sorted(set(re.findall(rf"[{valid}]", picked)))
    return found or None


def _icd_code(text):
    from .demo import parse_code_answer

    return parse_code_answer(text)


def _stage2_code(text):
    from .demo import parse_stage2_answer

    parsed = parse_stage2_answer(text)
    return parsed["code"] if parsed else None


def _plain_answer(text: str):
    cues = list(re.finditer(r"(?:answer|code|result)\s+is\s*:?|答案\s*(?:为|是|：|:)", text, re.I))
    if cues:
        text = re.split(r"[\n。]|\.(?:\s|$)", text[cues[-1].end():])[0]
    text = text.strip()
    return text or None


def _strip_code_prefix(text: str):
    text = re.sub(r"^\s*[A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?\s*:\s*", "", text)
    return text.strip() or None


def parse_set_answer(text: str) -> list | None:
    """Sorted normalised items of a generated extraction answer; None when nothing can be read.

    A JSON list (or an object holding one list, or a single object) anywhere in the text is read first;
    otherwise the text is split on "##", newlines and , ， ; ； 、. "[]", "none", "无" read as an empty set.
    """
    t = (text or "").strip()
    if not t:
        return None
    if t.casefold() in ("[]", "none", "null", "无", "没有", "n/a"):
        return []
    for m in re.finditer(r"\[.*\]|\{.*\}", t, re.S):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            obj = lists[0] if len(lists) == 1 else [obj]
        if isinstance(obj, list):
            return sorted({norm_set_item(x) for x in obj if norm_set_item(x)})
    parts = [norm_set_item(p) for p in re.split(r"##|[\n;；,，、]", t)]
    parts = sorted({p for p in parts if p})
    return parts or None


def set_counts(pred, gold):
    """(true positives, false positives, false negatives) of two item sets."""
    p, g = set(pred or ()), set(gold)
    return len(p & g), len(p - g), len(g - p)


def micro_f1(tp: int, fp: int, fn: int):
    """(precision, recall, F1) from summed counts; 1.0 when there is nothing to find and nothing predicted."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return prec, rec, f1


_ROUGE_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def rouge_tokens(text: str) -> list:
    """Lower-cased tokens for ROUGE: each CJK character alone, other letters/digits in runs; punctuation dropped."""
    return _ROUGE_TOKEN.findall((text or "").casefold())


def _lcs_len(a, b) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over `rouge_tokens`: 2 P R / (P + R), P = LCS/|pred|, R = LCS/|ref|."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return float(p == r)
    lcs = _lcs_len(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def clean_generation(text: str) -> str:
    """Generated text up to the first <|im_end|> (in case the tokenizer does not treat it as special)."""
    return text.split(IM_END, 1)[0]


def score_generation(item: Item, text: str) -> dict:
    """{pred, parsed, score, ...} of one generated answer. score: 0/1 (mcq, exact), ROUGE-L F1 (text),
    item F1 (set; the group metric is micro-F1 over the summed tp/fp/fn)."""
    text = clean_generation(text)
    if item.kind == "mcq":
        pred = extract_choice(text, [l for l, _ in item.options])
        return {"pred": pred, "parsed": pred is not None, "score": float(pred == item.gold)}
    if item.kind == "exact":
        pred = {"icd_code": _icd_code, "stage2_code": _stage2_code}.get(item.extractor, _plain_answer)(text)
        ok = pred is not None and _norm_text(pred) == _norm_text(item.gold)
        return {"pred": pred, "parsed": pred is not None, "score": float(ok)}
    if item.kind == "set":
        pred = parse_set_answer(text)
        tp, fp, fn = set_counts(pred, item.gold)
        return {"pred": pred, "parsed": pred is not None, "score": micro_f1(tp, fp, fn)[2],
                "exact": float(pred is not None and set(pred) == set(item.gold)), "tp": tp, "fp": fp, "fn": fn}
    pred = _strip_code_prefix(text) if item.extractor == "code_desc" else text.strip() or None
    return {"pred": pred, "parsed": pred is not None, "score": rouge_l(pred or "", item.gold),
            "exact": float(pred is not None and _norm_text(pred) == _norm_text(item.gold))}


def select_options(norm_scores: dict, multi: bool, mode: str = "threshold", threshold: float | None = None,
                   n_gold: int = 1) -> list:
    """Options chosen from length-normalised log-likelihoods.

    Single-answer items: the argmax. Multi-answer items: p = softmax over the options' normalised scores;
    mode "threshold" keeps every option with p >= threshold (default 1 / number of options, i.e. above
    uniform), and always the argmax; mode "top-gold" keeps the |gold| best (an oracle on the answer count).
    """
    letters = sorted(norm_scores, key=lambda l: (-norm_scores[l], l))
    if not multi:
        return [letters[0]]
    if mode == "top-gold":
        return sorted(letters[:max(1, n_gold)])
    m = max(norm_scores.values())
    z = sum(math.exp(v - m) for v in norm_scores.values())
    probs = {l: math.exp(v - m) / z for l, v in norm_scores.items()}
    t = 1.0 / len(norm_scores) if threshold is None else threshold
    return sorted({letters[0]} | {l for l, p in probs.items() if p >= t})


# ----- model side -------------------------------------------------------------------------------------------

_warned_no_template = False


def render_prompt(tokenizer, messages) -> str:
    """The chat-template rendering of the prompt turns with the assistant turn opened."""
    global _warned_no_template
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not _warned_no_template:
        log.warning("the tokenizer has no chat template: prompts are the plain turn contents")
        _warned_no_template = True
    return "\n\n".join(m["content"] for m in messages) + "\n"


def stop_token_ids(tokenizer, model=None) -> list:
    """<|im_end|> (when the vocabulary has it), the tokenizer's eos and the model's generation eos."""
    ids = []
    if IM_END in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(IM_END))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
    return list(dict.fromkeys(ids))


def _encode(tokenizer, text: str) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad_left(seqs, pad_id):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def _batches(order, batch_size):
    """Consecutive chunks of at most batch_size of `order` (sorted longest first, so padding stays small)."""
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def loglikelihoods(model, tokenizer, requests, batch_size: int = 8, max_length: int | None = None,
                   progress=None, device=None) -> list:
    """(sum of log p(continuation tokens | context), number of continuation tokens) per (context, continuation).

    Whitespace that ends the context is moved to the front of the continuation, so "The answer is " + "B"
    is tokenised like the natural "The answer is B". Sequences are left-padded (position ids from the
    attention mask) and only the last max(continuation)+1 positions' logits are computed.
    """
    import torch

    device = device or next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs, conts = [], []
    for context, continuation in requests:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        ctx, cont = _encode(tokenizer, stripped), _encode(tokenizer, continuation)
        if not cont:
            raise ValueError(f"empty continuation {continuation!r}")
        seq = ctx + cont
        if max_length and len(seq) > max_length:
            seq = seq[-max_length:]
        seqs.append(seq)
        conts.append(min(len(cont), len(seq) - 1))
    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with torch.inference_mode():
        for batch in _batches(order, batch_size):
            ids, mask = _pad_left([seqs[i] for i in batch], pad_id)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(conts[i] for i in batch) + 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           logits_to_keep=keep, use_cache=False).logits[:, -keep:]
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = ids[:, -(keep - 1):].to(device)
            tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu()
            for row, i in enumerate(batch):
                n = conts[i]
                out[i] = (float(tok_lp[row, keep - 1 - n:].double().sum()), n)
            if progress is not None:
                progress.update(len(batch))
    return out


def generate(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 8, max_length: int | None = None,
             progress=None, device=None, stop_ids=None) -> list:
    """Greedy continuations of already rendered prompts, stopping at <|im_end|> / eos; decoded without
    special tokens."""
    import torch
    from transformers import GenerationConfig

    device = device or next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop_ids = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=stop_ids or None, pad_token_id=pad_id)
    seqs = []
    for p in prompts:
        s = _encode(tokenizer, p)
        if max_length and len(s) + max_new_tokens > max_length:
            s = s[-max(1, max_length - max_new_tokens):]
        seqs.append(s)
    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with torch.inference_mode():
        for batch in _batches(order, batch_size):
            ids, mask = _pad_left([seqs[i] for i in batch], pad_id)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            new = gen[:, ids.shape[1]:].cpu()
            for row, i in enumerate(batch):
                toks = new[row].tolist()
                for j, t in enumerate(toks):  # cut at the first stop token (the rest is padding)
                    if t in stop_ids:
                        toks = toks[:j]
                        break
                out[i] = clean_generation(tokenizer.decode(toks, skip_special_tokens=True))
            if progress is not None:
                progress.update(len(batch))
    return out


def mcq_requests(tokenizer, item: Item, answer_prefix: str | None, target: str):
    """(context, continuation) per option for the log-likelihood scorer."""
    prefix = ANSWER_PREFIX[item.lang] if answer_prefix is None else answer_prefix
    context = render_prompt(tokenizer, item.messages) + prefix
    if target == "letter":
        bodies = [l for l, _ in item.options]
    elif target == "text":
        bodies = [t for _, t in item.options]
    else:
        bodies = [f"{l}. {t}" for l, t in item.options]
    sep = " " if context and (context[-1].isascii() and context[-1].isalnum()) else ""
    return [(context, sep + b) for b in bodies]


@dataclass
class EvalSettings:
    scorer: str = "both"                 # for mcq items: loglik | generate | both
    batch_size: int = 8
    max_new_tokens: int | None = None    # None: per kind (DEFAULT_MAX_NEW_TOKENS)
    max_length: int | None = None
    answer_prefix: str | None = None     # None: "The answer is " / "答案为" by the item's language
    loglik_target: str = "option"        # option ("B. text") | letter | text
    multi_select: str = "threshold"      # threshold | top-gold
    multi_threshold: float | None = None
    extra: dict = field(default_factory=dict)


def evaluate_items(model, tokenizer, items, settings: EvalSettings, progress=None, device=None) -> list:
    """Per-item result records of `items` (one per scorer applied)."""
    results = []
    mcq = [it for it in items if it.kind == "mcq"]
    use_ll = settings.scorer in ("loglik", "both")
    use_gen = settings.scorer in ("generate", "both")
    if use_ll and mcq:
        reqs, owners = [], []
        for it in mcq:
            r = mcq_requests(tokenizer, it, settings.answer_prefix, settings.loglik_target)
            reqs += r
            owners.append(len(r))
        lls = loglikelihoods(model, tokenizer, reqs, settings.batch_size, settings.max_length, progress, device)
        pos = 0
        for it, n in zip(mcq, owners):
            norm = {l: s / max(c, 1) for (l, _), (s, c) in zip(it.options, lls[pos:pos + n])}
            pos += n
            pred = select_options(norm, it.multi, settings.multi_select, settings.multi_threshold, len(it.gold))
            results.append(_record(it, "loglik", {"pred": pred, "parsed": True, "score": float(pred == it.gold),
                                                  "option_scores": {l: round(v, 5) for l, v in norm.items()}}))
    gen_items = [it for it in items if it.kind != "mcq" or use_gen]
    by_budget = defaultdict(list)
    for it in gen_items:
        by_budget[settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[it.kind]].append(it)
    stop_ids = stop_token_ids(tokenizer, model)
    for budget, group in sorted(by_budget.items()):
        texts = generate(model, tokenizer, [render_prompt(tokenizer, it.messages) for it in group], budget,
                         settings.batch_size, settings.max_length, progress, device, stop_ids)
        for it, text in zip(group, texts):
            results.append(_record(it, "generate", {**score_generation(it, text), "output": text}))
    return sorted(results, key=lambda r: (r["index"], r["scorer"]))


def _record(item: Item, scorer: str, res: dict) -> dict:
    return {"index": item.index, "file": item.file, "line": item.line, "id": item.id, "kind": item.kind,
            "type": item.type, "scorer": scorer, "gold": item.gold, **res}


def work_units(items, settings: EvalSettings) -> int:
    n = 0
    for it in items:
        if it.kind == "mcq":
            n += len(it.options) if settings.scorer in ("loglik", "both") else 0
            n += 1 if settings.scorer in ("generate", "both") else 0
        else:
            n += 1
    return n


# ----- aggregation and report -------------------------------------------------------------------------------

METRIC_OF_KIND = {"mcq": "accuracy", "exact": "accuracy", "text": "rouge_l", "set": "micro_f1"}


def _group_stats(records) -> dict:
    kinds = {r["kind"] for r in records}
    n = len(records)
    stats = {"n": n, "unparsed": sum(1 for r in records if not r["parsed"])}
    metrics = {METRIC_OF_KIND[k] for k in kinds}
    if kinds == {"set"}:
        tp, fp, fn = (sum(r[k] for r in records) for k in ("tp", "fp", "fn"))
        p, rc, f1 = micro_f1(tp, fp, fn)
        stats.update(metric="micro_f1", score=f1, precision=p, recall=rc,
                     exact_set=sum(r["exact"] for r in records) / n)
    elif len(metrics) == 1:
        stats.update(metric=metrics.pop(), score=sum(r["score"] for r in records) / n)
        if kinds == {"text"}:
            stats["exact_match"] = sum(r["exact"] for r in records) / n
    else:
        stats.update(metric="mixed", score=None)
    return stats


def aggregate(records, skipped=None) -> list:
    """Rows per (file, scorer) over all items ("type": "all") and per (file, type, scorer)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["file"], "all", r["scorer"])].append(r)
        groups[(r["file"], r["type"], r["scorer"])].append(r)
    files = list(dict.fromkeys(r["file"] for r in records))
    rows = []
    for (f, t, s), recs in sorted(groups.items(), key=lambda kv: (files.index(kv[0][0]), kv[0][1] != "all",
                                                                   kv[0][1], kv[0][2])):
        types = {r["type"] for r in recs}
        if t != "all" and len({r["type"] for r in groups[(f, "all", s)]}) == 1 and types == {t}:
            continue  # one type only: its row would repeat the file's
        rows.append({"file": f, "type": t, "scorer": s, **_group_stats(recs),
                     **({"skipped_rows": len(skipped.get(f, []))} if skipped and t == "all" else {})})
    # Several files scored alike: their unweighted mean (the paper's "average over benchmarks").
    for s in sorted({r["scorer"] for r in records}):
        per_file = [r for r in rows if r["type"] == "all" and r["scorer"] == s]
        if len(per_file) > 1 and all(r["score"] is not None for r in per_file) and \
                len({r["metric"] for r in per_file}) == 1:
            rows.append({"file": "ALL", "type": "mean over files", "scorer": s, "metric": per_file[0]["metric"],
                         "n": sum(r["n"] for r in per_file), "unparsed": sum(r["unparsed"] for r in per_file),
                         "score": sum(r["score"] for r in per_file) / len(per_file)})
    return rows


def markdown_table(rows) -> str:
    out = ["| file | type | scorer | metric | n | score | unparsed |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        score = "—" if r["score"] is None else f"{100 * r['score']:.2f}"
        name = Path(r["file"]).name if r["type"] in ("all", "mean over files") else ""
        out.append(f"| {name} | {r['type']} | {r['scorer']} | "
                   f"{r['metric']} | {r['n']} | {score} | {r['unparsed']} |")
    return "\n".join(out) + "\n"


# ----- distributed ------------------------------------------------------------------------------------------

def _world_from_env() -> int:
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def setup_distributed():
    """(rank, world): the running process group, or one started from a launcher's environment, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if _world_from_env() > 1:
        from .distributed import init_distributed

        return init_distributed()
    return 0, 1


def gather_to_rank0(obj, rank: int, world: int):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    bucket = [None] * world if rank == 0 else None
    dist.gather_object(obj, bucket, dst=0)
    return bucket


# ----- model loading ----------------------------------------------------------------------------------------

def load_model(model_dir, adapters=None, dtype: str = "auto", device: str = "auto", merge: bool = True):
    """(model, tokenizer, device) from a HF directory, optionally with our adapters (adapter_io) on top.

    dtype auto: float32 on the CPU, the checkpoint's dtype on a GPU. With merge (default) adapters that
    fold into the weights (everything except stage 1's routed mixture) are folded for speed.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .modeling import TORCH_DTYPES

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BenchmarkError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        cfg_dtype = getattr(AutoConfig.from_pretrained(str(model_dir), local_files_only=True), "dtype", None)
        torch_dtype = torch.float32 if str(device).startswith("cpu") or cfg_dtype is None else cfg_dtype
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
    else:
        torch_dtype = TORCH_DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, local_files_only=True)
    if adapters is not None:
        from .adapter_io import load_adapters
        from .adapters import MixtureOfLoRALinear
        from .injection import adapter_layers, merge_all

        load_adapters(model, adapters)
        if merge and not adapter_layers(model, MixtureOfLoRALinear):
            merge_all(model)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device


def demo_inputs(run_dir):
    """(model dir, adapters dir or None, benchmark files) of a finished (or stage-1) demo run."""
    run = Path(run_dir)
    data = run / "demo_assets" / "data"
    files = [data / "stage1_eval.jsonl", data / "stage2_eval.jsonl"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise BenchmarkError(f"{run}: not a demo run directory (missing {', '.join(missing)})")
    if (run / "final" / "config.json").is_file():
        return run / "final", None, files
    merged = run / "merged_base"
    if (merged / "config.json").is_file():
        for adapters in (run / "stage2" / "adapters", merged / "knowledge_adapters"):
            if (adapters / "adapter_config.json").is_file():
                return merged, adapters, files
    raise BenchmarkError(f"{run}: no final/ or merged_base/ model yet (is the run finished?)")


# ----- driver -----------------------------------------------------------------------------------------------

def load_all(files, *, kind=None, index_base="auto", instruction=None, on_bad_row="error", limit=None,
             sample_seed=0):
    items, skipped = [], {}
    for f in files:
        its, sk = load_benchmark(f, kind=kind, index_base=index_base, instruction=instruction,
                                 on_bad_row=on_bad_row)
        if limit is not None and len(its) > limit:
            its = sorted(random.Random(sample_seed).sample(its, limit), key=lambda it: it.line)
        items += its
        if sk:
            skipped[str(f)] = sk
    for i, it in enumerate(items):
        it.index = i
    return items, skipped


def run_eval(model, tokenizer, files, settings: EvalSettings | None = None, output=None, *, rank=0, world=1,
             device=None, load_kw=None, show_progress=True, meta=None, loaded=None):
    """Evaluate `files` with the already loaded model; rank 0 returns (and writes) the results dict.

    `loaded`: the (items, skipped) of `load_all(files, **load_kw)` when already read.
    """
    from tqdm import tqdm

    settings = settings or EvalSettings()
    items, skipped = loaded if loaded is not None else load_all(files, **(load_kw or {}))
    shard = items[rank::world]
    t0 = time.perf_counter()
    bar = tqdm(total=work_units(shard, settings), desc=f"eval ({world} rank{'s' if world > 1 else ''})",
               disable=rank != 0 or not show_progress, dynamic_ncols=True, unit="seq")
    try:
        records = evaluate_items(model, tokenizer, shard, settings, bar, device)
    finally:
        bar.close()
    gathered = gather_to_rank0(records, rank, world)
    if rank != 0:
        return None
    records = sorted((r for part in gathered for r in part), key=lambda r: (r["index"], r["scorer"]))
    rows = aggregate(records, skipped)
    result = {
        **(meta or {}),
        "files": [str(f) for f in files],
        "world_size": world,
        "seconds": round(time.perf_counter() - t0, 2),
        "settings": {k: v for k, v in asdict(settings).items() if k != "extra"} | settings.extra,
        "items": len(items),
        "skipped_rows": {f: [{"line": l, "error": e} for l, e in sk] for f, sk in skipped.items()},
        "results": rows,
    }
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
        (out / "results.md").write_text(markdown_table(rows), encoding="utf-8")
        with open(out / "items.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    result["records"] = records
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m medcare_dist.eval",
        description="Evaluate a causal LM (a merged HF model, or a base + our adapters) on medical benchmark "
                    "files: multiple choice (option log-likelihood and/or generate-then-extract), extraction "
                    "(micro-F1), normalisation (exact match) and free text (ROUGE-L).")
    p.add_argument("files", nargs="*", help="benchmark files (.json / .jsonl)")
    p.add_argument("--model", help="Hugging Face model directory (e.g. runs/demo/final, or merged_base with "
                                   "--adapters)")
    p.add_argument("--adapters", help="medcare-dist adapter directory to load on --model "
                                      "(e.g. runs/demo/stage2/adapters)")
    p.add_argument("--demo", metavar="RUN_DIR", help="a demo run: its model (final/, else merged_base/ + "
                                                     "adapters) and its held-out splits")
    p.add_argument("--output", help="directory for results.json, results.md, items.jsonl "
                                    "(default RUN_DIR/eval with --demo, else eval_results)")
    p.add_argument("--scorer", choices=SCORERS, default="both", help="multiple-choice scorer(s) (default both)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"generation budget for every item (default per kind: {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--max-length", type=int, default=None, help="truncate prompts from the left to this many tokens")
    p.add_argument("--answer-prefix", default=None,
                   help="loglik: text opening the answer before the option (default 'The answer is ' / '答案为')")
    p.add_argument("--loglik-target", choices=("option", "letter", "text"), default="option",
                   help="loglik: score 'B. <text>' (default), the letter alone, or the option text alone")
    p.add_argument("--multi-select", choices=("threshold", "top-gold"), default="threshold",
                   help="loglik, multi-answer items: softmax threshold (default) or the |gold| best options")
    p.add_argument("--multi-threshold", type=float, default=None,
                   help="loglik threshold on the options' softmax (default 1/number of options)")
    p.add_argument("--instruction", default=None,
                   help="instruction line appended to built MCQ prompts ('' for none; default by language)")
    p.add_argument("--kind", choices=KINDS, default=None, help="force the item kind of every row")
    p.add_argument("--index-base", choices=("auto", "0", "1"), default="auto",
                   help="integer answers are option indices from 0 or 1 (auto: detected per file)")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many items per file: a seeded random sample, kept in file order")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the --limit sample")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-merge", action="store_true", help="keep --adapters as separate layers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_cli(argv=None):
    """The command line's work; returns the results dict on rank 0 (None on other ranks)."""
    from .adapter_io import AdapterCheckpointError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        files = [Path(f) for f in args.files]
        model_dir, adapters = args.model, args.adapters
        output = args.output
        if args.demo:
            d_model, d_adapters, d_files = demo_inputs(args.demo)
            if model_dir is None:
                model_dir, adapters = d_model, d_adapters
            files = files or d_files
            output = output or str(Path(args.demo) / "eval")
        if model_dir is None:
            raise BenchmarkError("no model: pass --model DIR (and --adapters DIR) or --demo RUN_DIR")
        if not files:
            raise BenchmarkError("no benchmark files given")
        for f in files:
            if not f.is_file():
                raise BenchmarkError(f"{f}: no such file")
        # Read every file before loading a model: a bad row fails in a second, not after minutes.
        load_kw = dict(kind=args.kind, index_base=args.index_base, instruction=args.instruction,
                       on_bad_row=args.on_bad_row, limit=args.limit, sample_seed=args.sample_seed)
        loaded = load_all(files, **load_kw)
        rank, world = setup_distributed()
        model, tokenizer, device = load_model(model_dir, adapters, args.dtype, args.device, not args.no_merge)
        settings = EvalSettings(scorer=args.scorer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                max_length=args.max_length, answer_prefix=args.answer_prefix,
                                loglik_target=args.loglik_target, multi_select=args.multi_select,
                                multi_threshold=args.multi_threshold,
                                extra={"limit": args.limit, "sample_seed": args.sample_seed, "kind": args.kind,
                                       "index_base": args.index_base, "dtype": args.dtype,
                                       "merged_adapters": bool(adapters) and not args.no_merge})
        meta = {"model": str(model_dir), "adapters": str(adapters) if adapters else None}
        result = run_eval(model, tokenizer, files, settings, output or "eval_results", rank=rank, world=world,
                          device=device, show_progress=not args.quiet, meta=meta, loaded=loaded)
    except (BenchmarkError, AdapterCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result is not None:
        print(markdown_table(result["results"]), end="")
        print(f"written: {Path(output or 'eval_results') / 'results.json'}", file=sys.stderr)
    return result


def main(argv=None) -> int:
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
