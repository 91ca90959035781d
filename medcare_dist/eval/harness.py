"""Benchmark evaluation of a causal LM (model side, ranks, CLI): `python -m medcare_dist.eval`.

Takes the `Item`s of medcare_dist.eval.benchmarks, renders their prompts with the
tokenizer's chat template, and scores multiple-choice items by option
log-likelihood and/or by generate-then-extract, everything else by generation
(answers read and scored by medcare_dist.eval.scoring). Items are sharded over
ranks when launched with several (torchrun, deepspeed, mpirun) and gathered
on rank 0, which writes `results.json`, `results.md` and `items.jsonl`.
See docs/evaluation.md for the exact rules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medcare_dist.eval.benchmarks import KINDS, BenchmarkError, Item, load_all
from medcare_dist.eval.fewshot import DEFAULT_SEED as DEFAULT_FEWSHOT_SEED, add_fewshot
from medcare_dist.eval.scoring import (
    IM_END, aggregate, clean_generation, lm_eval_section, markdown_table, score_generation, select_options,
)

log = logging.getLogger("medcare_dist.eval.harness")

SCORERS = ("loglik", "generate", "both")

DEFAULT_MAX_NEW_TOKENS = {"mcq": 32, "exact": 48, "set": 128, "text": 128}
ANSWER_PREFIX = {"en": "The answer is ", "zh": "答案为"}


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


def split_encoding(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """(context ids, continuation ids) the way lm-evaluation-harness splits them: whitespace ending the context
    moves to the front of the continuation, the whole text is encoded at once (a BPE may merge across the
    boundary, as it does in the canonical tokenisation), and the continuation is what follows the context's
    own encoding."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = _encode(tokenizer, stripped + continuation)
    n_ctx = len(_encode(tokenizer, stripped))
    return whole[:n_ctx], whole[n_ctx:]


def loglikelihoods(model, tokenizer, requests, batch_size: int = 8, max_length: int | None = None,
                   progress=None, device=None) -> list:
    """(sum of log p(continuation tokens | context), number of continuation tokens) per (context, continuation).

    Context and continuation are split as `split_encoding` does (lm-eval's rule), so "The answer is " + "B"
    is tokenised like the natural "The answer is B". Sequences are left-padded (position ids from the
    attention mask) and only the last max(continuation)+1 positions' logits are computed.
    """
    import torch

    device = device or next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs, conts = [], []
    for context, continuation in requests:
        ctx, cont = split_encoding(tokenizer, context, continuation)
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
    return [(context, option_separator(context) + b) for b in bodies]


def option_separator(context: str) -> str:
    """The space lm-eval puts between context and option (its target_delimiter), except after whitespace and
    after CJK text, where no space is written ("答案为B")."""
    if not context or context[-1].isspace():
        return ""
    return "" if _is_cjk(context[-1]) else " "


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (0x2E80 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0xFF00 <= code <= 0xFFEF
            or 0x3000 <= code <= 0x303F)


@dataclass
class EvalSettings:
    scorer: str = "both"                 # for mcq items: loglik | generate | both
    batch_size: int = 8
    max_new_tokens: int | None = None    # None: per kind (DEFAULT_MAX_NEW_TOKENS)
    max_length: int | None = None
    answer_prefix: str | None = None     # None: "The answer is " / "答案为" by the item's language
    loglik_target: str = "option"        # option ("B. text") | letter | text
    # How options are ranked: token (mean log-probability per token), sum (lm-eval's acc), char (the sum per
    # character of the continuation, lm-eval's acc_norm).
    normalization: str = "token"
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
            mine, conts = lls[pos:pos + n], [c for _, c in reqs[pos:pos + n]]
            pos += n
            raw = {l: {"sum": round(s, 6), "tokens": c, "chars": len(cont)}
                   for (l, _), (s, c), cont in zip(it.options, mine, conts)}
            norm = {l: normalized(r, settings.normalization) for l, r in raw.items()}
            pred = select_options(norm, it.multi, settings.multi_select, settings.multi_threshold, len(it.gold))
            results.append(_record(it, "loglik", {"pred": pred, "parsed": True, "score": float(pred == it.gold),
                                                  "normalization": settings.normalization,
                                                  "option_scores": {l: round(v, 5) for l, v in norm.items()},
                                                  "option_logliks": raw}))
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


NORMALIZATIONS = ("token", "sum", "char")


def normalized(option: dict, how: str) -> float:
    """An option's score from its summed log-likelihood: per token, the sum itself (lm-eval acc) or per
    character of the continuation (lm-eval acc_norm)."""
    if how == "sum":
        return option["sum"]
    if how == "char":
        return option["sum"] / max(option["chars"], 1)
    return option["sum"] / max(option["tokens"], 1)


def _record(item: Item, scorer: str, res: dict) -> dict:
    return {"index": item.index, "file": item.file, "line": item.line, "id": item.id, "kind": item.kind,
            "type": item.type, "scorer": scorer, "gold": item.gold, **({"fewshot": item.fewshot} if item.fewshot else {}),
            **res}


def work_units(items, settings: EvalSettings) -> int:
    n = 0
    for it in items:
        if it.kind == "mcq":
            n += len(it.options) if settings.scorer in ("loglik", "both") else 0
            n += 1 if settings.scorer in ("generate", "both") else 0
        else:
            n += 1
    return n


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
        from medcare_dist.training.distributed import init_distributed

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

    from medcare_dist.training.modeling import TORCH_DTYPES

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
        from medcare_dist.method.adapter_io import load_adapters
        from medcare_dist.method.adapters import MixtureOfLoRALinear
        from medcare_dist.method.injection import adapter_layers, merge_all

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

def run_eval(model, tokenizer, files, settings: EvalSettings | None = None, output=None, *, rank=0, world=1,
             device=None, load_kw=None, show_progress=True, meta=None, loaded=None, totals=None):
    """Evaluate `files` with the already loaded model; rank 0 returns (and writes) the results dict.

    `loaded`: the (items, skipped) of `load_all(files, **load_kw)` when already read; `totals` the item
    counts per benchmark before a --limit sample (for the lm-eval section).
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
        "lm_eval": lm_eval_section(records, totals or {}, settings.extra.get("num_fewshot", 0)),
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
    p.add_argument("files", nargs="*", help="benchmarks: .json/.jsonl/.parquet/.arrow/.csv files, folders of them, "
                                            "or save_to_disk folders")
    p.add_argument("--split", default=None, help="the split of save_to_disk DatasetDict benchmarks")
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
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="token",
                   help="loglik: rank options by mean log-probability per token (default), by the summed "
                        "log-likelihood (lm-eval's acc) or by it per character (lm-eval's acc_norm); every "
                        "option's sum and token and character counts are in items.jsonl either way")
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
    p.add_argument("--num-fewshot", type=int, default=0, metavar="K",
                   help="put K solved examples before each item as earlier chat turns (lm-eval's "
                        "--fewshot_as_multiturn); from --fewshot-file, else from the same benchmark")
    p.add_argument("--fewshot-file", default=None, help="source of the examples (a dev split), any benchmark format")
    p.add_argument("--fewshot-split", default=None, help="the split of a save_to_disk --fewshot-file")
    p.add_argument("--fewshot-seed", type=int, default=DEFAULT_FEWSHOT_SEED,
                   help=f"seed of the example draw (default {DEFAULT_FEWSHOT_SEED}, lm-eval's)")
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
    from medcare_dist.method.adapter_io import AdapterCheckpointError

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
            if not f.exists():
                raise BenchmarkError(f"{f}: no such file or folder")
        if args.num_fewshot < 0:
            raise BenchmarkError(f"--num-fewshot {args.num_fewshot}: must be 0 or more")
        if args.fewshot_file and not args.num_fewshot:
            raise BenchmarkError("--fewshot-file given with --num-fewshot 0: no example would be used")
        # Read every file before loading a model: a bad row fails in a second, not after minutes.
        load_kw = dict(kind=args.kind, index_base=args.index_base, instruction=args.instruction,
                       on_bad_row=args.on_bad_row, limit=args.limit, sample_seed=args.sample_seed, split=args.split)
        totals = {}
        loaded = load_all(files, **load_kw, totals=totals)
        if args.num_fewshot:
            if args.fewshot_file:
                pool, _ = load_all([Path(args.fewshot_file)], kind=args.kind, index_base=args.index_base,
                                   instruction=args.instruction, on_bad_row=args.on_bad_row, split=args.fewshot_split)
            else:  # the whole benchmark (not only a --limit sample); an item is never its own example
                pool, _ = load_all(files, **{**load_kw, "limit": None})
            add_fewshot(loaded[0], pool, args.num_fewshot, seed=args.fewshot_seed, answer_prefix=args.answer_prefix,
                        target=args.loglik_target)
        rank, world = setup_distributed()
        model, tokenizer, device = load_model(model_dir, adapters, args.dtype, args.device, not args.no_merge)
        settings = EvalSettings(scorer=args.scorer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                max_length=args.max_length, answer_prefix=args.answer_prefix,
                                loglik_target=args.loglik_target, normalization=args.normalization,
                                multi_select=args.multi_select,
                                multi_threshold=args.multi_threshold,
                                extra={"limit": args.limit, "sample_seed": args.sample_seed, "kind": args.kind,
                                       "split": args.split, "num_fewshot": args.num_fewshot,
                                       "fewshot_file": args.fewshot_file, "fewshot_seed": args.fewshot_seed,
                                       "index_base": args.index_base, "dtype": args.dtype,
                                       "merged_adapters": bool(adapters) and not args.no_merge})
        meta = {"model": str(model_dir), "adapters": str(adapters) if adapters else None}
        result = run_eval(model, tokenizer, files, settings, output or "eval_results", rank=rank, world=world,
                          device=device, show_progress=not args.quiet, meta=meta, loaded=loaded, totals=totals)
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
