"""Answer extraction and metrics: pure functions from generated answers to scores and result tables.

Reads option letters, codes, item sets and free text out of generated
answers, scores them against an `Item`'s gold (accuracy, micro-F1,
ROUGE-L), picks options from log-likelihoods, and aggregates per-item
records into result rows and a markdown table. No model, no torch.
See docs/evaluation.md for the exact rules.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from medcare_dist.eval.benchmarks import Item, norm_set_item, norm_text

IM_END = "<|im_end|>"


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
    from medcare_dist.demo.assets import parse_code_answer

    return parse_code_answer(text)


def _stage2_code(text):
    from medcare_dist.demo.assets import parse_stage2_answer

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
        ok = pred is not None and norm_text(pred) == norm_text(item.gold)
        return {"pred": pred, "parsed": pred is not None, "score": float(ok)}
    if item.kind == "set":
        pred = parse_set_answer(text)
        tp, fp, fn = set_counts(pred, item.gold)
        return {"pred": pred, "parsed": pred is not None, "score": micro_f1(tp, fp, fn)[2],
                "exact": float(pred is not None and set(pred) == set(item.gold)), "tp": tp, "fp": fp, "fn": fn}
    pred = _strip_code_prefix(text) if item.extractor == "code_desc" else text.strip() or None
    return {"pred": pred, "parsed": pred is not None, "score": rouge_l(pred or "", item.gold),
            "exact": float(pred is not None and norm_text(pred) == norm_text(item.gold))}


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


# ----- aggregation and report -------------------------------------------------------------------------------

METRIC_OF_KIND = {"mcq": "accuracy", "exact": "accuracy", "text": "rouge_l", "set": "micro_f1"}
BOOTSTRAP_RESAMPLES = 1000


def mean_stderr(values) -> float | None:
    """Standard error of a mean: sample standard deviation (n - 1) over sqrt(n), lm-eval's mean_stderr."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def bootstrap_f1_stderr(records, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float | None:
    """Standard error of a corpus-level micro-F1 by a seeded bootstrap over items (F1 is not a mean)."""
    import random

    n = len(records)
    if n < 2:
        return None
    rng = random.Random(seed)
    counts = [(r["tp"], r["fp"], r["fn"]) for r in records]
    scores = []
    for _ in range(resamples):
        tp = fp = fn = 0
        for _ in range(n):
            a, b, c = counts[rng.randrange(n)]
            tp, fp, fn = tp + a, fp + b, fn + c
        scores.append(micro_f1(tp, fp, fn)[2])
    mu = sum(scores) / resamples
    return math.sqrt(sum((x - mu) ** 2 for x in scores) / (resamples - 1))


def _group_stats(records) -> dict:
    kinds = {r["kind"] for r in records}
    n = len(records)
    stats = {"n": n, "unparsed": sum(1 for r in records if not r["parsed"])}
    metrics = {METRIC_OF_KIND[k] for k in kinds}
    if kinds == {"set"}:
        tp, fp, fn = (sum(r[k] for r in records) for k in ("tp", "fp", "fn"))
        p, rc, f1 = micro_f1(tp, fp, fn)
        stats.update(metric="micro_f1", score=f1, stderr=bootstrap_f1_stderr(records), precision=p, recall=rc,
                     exact_set=sum(r["exact"] for r in records) / n)
    elif len(metrics) == 1:
        scores = [r["score"] for r in records]
        stats.update(metric=metrics.pop(), score=sum(scores) / n, stderr=mean_stderr(scores))
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
            errors = [r.get("stderr") for r in per_file]
            stderr = None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(per_file)
            rows.append({"file": "ALL", "type": "mean over files", "scorer": s, "metric": per_file[0]["metric"],
                         "n": sum(r["n"] for r in per_file), "unparsed": sum(r["unparsed"] for r in per_file),
                         "score": sum(r["score"] for r in per_file) / len(per_file), "stderr": stderr})
    return rows


def markdown_table(rows) -> str:
    out = ["| file | type | scorer | metric | n | score ± stderr | unparsed |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        score = "—" if r["score"] is None else f"{100 * r['score']:.2f}"
        if r["score"] is not None and r.get("stderr") is not None:
            score += f" ± {100 * r['stderr']:.2f}"
        name = Path(r["file"]).name if r["type"] in ("all", "mean over files") else ""
        out.append(f"| {name} | {r['type']} | {r['scorer']} | "
                   f"{r['metric']} | {r['n']} | {score} | {r['unparsed']} |")
    return "\n".join(out) + "\n"


def lm_eval_section(records, totals: dict, num_fewshot: int) -> dict:
    """The multiple-choice results in lm-eval's results.json layout: per benchmark (task = file name without
    suffix) acc (argmax of the summed option log-likelihoods) and acc_norm (argmax of the sum per character
    of the continuation) with their standard errors, from the log-likelihood scorer's single-answer items."""
    import numpy as np

    by_task = defaultdict(list)
    for r in records:
        if r["scorer"] == "loglik" and r["kind"] == "mcq" and len(r["gold"]) == 1:
            by_task[r["file"]].append(r)
    out = {"results": {}, "n-shot": {}, "n-samples": {}, "higher_is_better": {}}
    for file, recs in by_task.items():
        task = Path(file).name.rsplit(".", 1)[0] if Path(file).suffix else Path(file).name
        acc, acc_norm = [], []
        for r in recs:
            letters = list(r["option_logliks"])
            lls = np.array([r["option_logliks"][l]["sum"] for l in letters])
            chars = np.array([float(r["option_logliks"][l]["chars"]) for l in letters])
            gold = letters.index(r["gold"][0])
            acc.append(float(np.argmax(lls) == gold))
            acc_norm.append(float(np.argmax(lls / chars) == gold))
        out["results"][task] = {"alias": task, "acc,none": sum(acc) / len(acc), "acc_stderr,none": mean_stderr(acc),
                                "acc_norm,none": sum(acc_norm) / len(acc_norm),
                                "acc_norm_stderr,none": mean_stderr(acc_norm)}
        out["n-shot"][task] = num_fewshot
        # lm-eval's "original" is the benchmark's size, "effective" what was scored (after --limit).
        out["n-samples"][task] = {"original": totals.get(file, len(recs)), "effective": len(recs)}
        out["higher_is_better"][task] = {"acc": True, "acc_norm": True}
    return out
