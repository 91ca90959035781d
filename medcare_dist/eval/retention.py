"""General-ability retention: how far a fine-tuned model moved from its base on prompts neither stage trains on.

Before stage 1 the base model answers a fixed set of general (non-medical) prompts greedily; those answers
are the reference (`general_reference.json` in output_dir, keyed by the base model's files so a reference of
another base is never used). Any later model is scored against it:
- `mean_token_loglik`: the mean log-probability per token the model gives the base's own answers
  (teacher-forced). The base scores its best here; a drop is forgetting, in nats per token.
- `close_fraction`: the share of prompts whose greedy answer stays close to the base's (ROUGE-L F1 >= 0.5).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medcare_dist.errors import InputError

REFERENCE_NAME = "general_reference.json"
CLOSE_ROUGE_L = 0.5
MAX_NEW_TOKENS = 48
REFERENCE_FORMAT = 1

# Everyday instructions of the kind general chat benchmarks hold; nothing medical, nothing either stage trains.
GENERAL_PROMPTS = (
    "Give three tips for staying productive when working from home.",
    "What is the capital of France?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Write a haiku about autumn leaves.",
    "Explain what a prime number is in one sentence.",
    "What is 17 plus 25?",
    "Name three primary colors.",
    "Summarize the plot of Cinderella in two sentences.",
    "How many days are there in a leap year?",
    "Suggest a name for a small coffee shop.",
    "What is the opposite of 'ancient'?",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "Why is the sky blue? Answer briefly.",
    "List the first five planets from the sun.",
    "Convert 3 kilometres to metres.",
    "Give an example of a sentence in the past tense.",
    "What does a librarian do?",
    "Write a Python one-liner that reverses a string s.",
    "What is the boiling point of water at sea level in Celsius?",
    "Recommend a board game for a family evening and say why.",
    "Describe the colour green to someone in one sentence.",
    "What is the plural of 'mouse'?",
    "Write a two-line rhyme about the sea.",
    "Which is heavier, a kilogram of iron or a kilogram of feathers?",
)


class RetentionError(InputError):
    """A general-ability reference that does not belong to this run's base model."""


def base_fingerprint(model_dir: Path) -> str:
    """Digest of the base model's config and weight files: a reference is valid for these bytes only."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".bin") or path.name == "tokenizer.model"):
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:24]


def _messages(prompt: str) -> list:
    return [{"role": "user", "content": prompt}]


def record_reference(model, tokenizer, base_dir: Path, out: Path, device="cpu", batch_size: int = 8) -> dict:
    """The base model's greedy answers to GENERAL_PROMPTS, written to out/general_reference.json (atomically)."""
    from medcare_dist.eval.harness import generate, render_prompt

    prompts = [render_prompt(tokenizer, _messages(p)) for p in GENERAL_PROMPTS]
    answers = generate(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=batch_size, device=device)
    ref = {"format": REFERENCE_FORMAT, "base_model": str(base_dir), "base_fingerprint": base_fingerprint(base_dir),
           "max_new_tokens": MAX_NEW_TOKENS, "prompts": list(GENERAL_PROMPTS), "answers": answers}
    path = Path(out) / REFERENCE_NAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ref, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return ref


def read_reference(out: Path, base_dir: Path) -> dict | None:
    """The recorded reference, None when there is none; RetentionError when it belongs to another base model."""
    path = Path(out) / REFERENCE_NAME
    if not path.is_file():
        return None
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RetentionError(f"{path}: not valid JSON ({e}); delete it to record the reference again") from None
    if not isinstance(ref, dict) or ref.get("format") != REFERENCE_FORMAT or ref.get("prompts") != list(GENERAL_PROMPTS):
        raise RetentionError(f"{path}: written by another version of the general prompts; delete it to record "
                             "the reference again")
    if ref.get("base_fingerprint") != base_fingerprint(base_dir):
        raise RetentionError(f"{path}: recorded for another base model ({ref.get('base_model')}) than "
                             f"{base_dir}; delete it to record the reference of this one")
    return ref


def ensure_reference(base_dir: Path, out: Path, dtype: str = "auto") -> dict:
    """Record the base model's reference answers unless a valid one is already in out (rank 0 only)."""
    ref = read_reference(out, base_dir)
    if ref is not None:
        return ref
    from medcare_dist.eval.harness import load_model

    model, tokenizer, device = load_model(base_dir, dtype=dtype)
    return record_reference(model, tokenizer, base_dir, out, device)


def answer_logliks(model, tokenizer, prompts, answers, device="cpu") -> tuple[float, int]:
    """(summed log p, token count) of each answer's tokens after its rendered prompt, teacher-forced.

    Prompt and answer are encoded apart and joined, as the base produced them: the answer's tokens follow
    the prompt's, and only they are scored.
    """
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers):
            ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            cont = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not cont:
                continue
            ids = torch.tensor([ctx + cont], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(ctx) - 1:-1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            total += float(logp.gather(-1, ids[0, len(ctx):].unsqueeze(-1)).double().sum())
            count += len(cont)
    return total, count


def score_retention(model, tokenizer, ref: dict, device="cpu", batch_size: int = 8) -> dict:
    """{mean_token_loglik, close_fraction, n} of a model against the base's reference answers."""
    from medcare_dist.eval.harness import generate, render_prompt
    from medcare_dist.eval.scoring import rouge_l

    prompts = [render_prompt(tokenizer, _messages(p)) for p in ref["prompts"]]
    total, tokens = answer_logliks(model, tokenizer, prompts, ref["answers"], device)
    answers = generate(model, tokenizer, prompts, ref["max_new_tokens"], batch_size=batch_size, device=device)
    close = [rouge_l(a, r) >= CLOSE_ROUGE_L for a, r in zip(answers, ref["answers"])]
    return {"mean_token_loglik": total / tokens if tokens else None,
            "close_fraction": sum(close) / len(close), "n": len(close)}
