"""Held-out check of a trained model on the embedded demo's eval splits (greedy generation).

Knowledge (stage-1 tasks): multiple-choice letter accuracy, description -> code
accuracy, code -> description exact match. Alignment (stage 2, "cdn"): the
share of answers in the required structured format and the share with the
right code. A quick report for the demo; the full evaluator is a separate tool.
"""

import json
import random
from pathlib import Path

import torch

from .demo import parse_code_answer, parse_mcq_answer, parse_stage2_answer


def _score(task: str, row: dict, text: str) -> dict:
    if task == "mcq":
        return {"accuracy": float(parse_mcq_answer(text) == row["answer"])}
    if task == "desc_to_code":
        return {"accuracy": float(parse_code_answer(text) == row["code"])}
    if task == "cdn":
        parsed = parse_stage2_answer(text)
        return {"format_rate": float(parsed is not None),
                "accuracy": float(parsed is not None and parsed["code"] == row["code"])}
    reference = row["messages"][-1]["content"]
    return {"exact_match": float(text.strip() == reference.strip())}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        outputs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outputs


def evaluate_demo(model_dir: Path, assets, per_task: int = 48, max_new_tokens: int = 48, seed: int = 0) -> dict:
    """{task: {metric: mean, "n": count}} over a fixed sample of each held-out task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    rows_by_task: dict[str, list] = {}
    for split in ("stage1_eval", "stage2_eval"):
        for line in Path(assets.files[split]).read_text().splitlines():
            row = json.loads(line)
            rows_by_task.setdefault(row["task"], []).append(row)
    results = {}
    rng = random.Random(seed)
    for task, rows in sorted(rows_by_task.items()):
        sample = rng.sample(rows, min(per_task, len(rows)))
        texts = generate(model, tokenizer, [r["messages"][:-1] for r in sample], max_new_tokens)
        scores = [_score(task, r, t) for r, t in zip(sample, texts)]
        results[task] = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
        results[task]["n"] = len(scores)
    return results
