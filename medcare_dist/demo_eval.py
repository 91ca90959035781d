"""Held-out results of a model on the embedded demo's eval splits, for reports and the ablation.

Per demo task (generation scored by medcare_dist.eval): multiple-choice and
description -> code accuracy, code -> description ROUGE-L, and for the stage-2
"cdn" task the share of answers in the required JSON format and the share with
the right code; plus the held-out loss, the most sensitive forgetting signal
on a tiny model.
"""

from collections import defaultdict
from pathlib import Path

import torch


def evaluate_demo(model_dir: Path, assets, batch_size: int = 32) -> dict:
    """{task: {"score", "metric", "parsed_rate", "n"}} over both held-out splits."""
    from . import eval as bench

    model, tokenizer, device = bench.load_model(model_dir, dtype="fp32", device="cpu")
    items, _ = bench.load_all([assets.files["stage1_eval"], assets.files["stage2_eval"]])
    records = bench.evaluate_items(model, tokenizer, items, bench.EvalSettings(scorer="generate",
                                                                               batch_size=batch_size),
                                   device=device)
    by_task = defaultdict(list)
    for r in records:
        by_task[r["type"]].append(r)
    return {task: {"metric": bench.METRIC_OF_KIND[recs[0]["kind"]], "score": sum(r["score"] for r in recs) / len(recs),
                   "parsed_rate": sum(r["parsed"] for r in recs) / len(recs), "n": len(recs)}
            for task, recs in sorted(by_task.items())}


@torch.no_grad()
def heldout_loss(model_dir: Path, data_file: Path, max_length: int = 128, batch_size: int = 16) -> float:
    """Mean assistant-token cross-entropy of a model on a held-out JSONL split.

    More sensitive than accuracy for measuring forgetting on a tiny model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import collate, load_stage_dataset
    from .trainer import token_loss_sum

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    dataset, _ = load_stage_dataset([{"path": str(data_file), "format": "auto", "max_samples": None}], tokenizer,
                                    max_length)
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                        tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(token_loss_sum(logits, batch["labels"]))
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(tokens, 1)
