"""The embedded default backbone: a tiny Qwen2 model briefly pretrained on ICD-10-CM text.

A frozen backbone with random weights cannot be steered by small adapters
(its embeddings and output head are noise), so the demo first gives the tiny
model what a real base LLM brings: language, and medical text it has read.
It is pretrained, all parameters, as a plain language model on the tabular
list's descriptions (no codes, no chat format, none of the stages' tasks);
then it is frozen like any downloaded checkpoint.
"""

import logging
import math

import torch

from .demo import DEFAULT_CATEGORIES, _icd, demo_model_config

log = logging.getLogger(__name__)


def pretraining_corpus() -> list[str]:
    """The descriptions of the demo's categories and their codes, one per line.

    Codes and inclusion terms are left out: mapping codes to descriptions is
    what stage 1 teaches, and inclusion terms are stage 2's held-out phrases.
    """
    icd = _icd()
    lines = []
    for category in DEFAULT_CATEGORIES:
        lines.append(icd.get_description(category))
        lines += [icd.get_description(c) for c in icd.get_descendants(category)]
    return lines


def build_demo_base(out_dir, tokenizer, tiny_cfg, seed: int, steps: int = 150, seq_len: int = 128,
                    batch_size: int = 16, lr: float = 3e-3):
    """Pretrain the tiny model from a seeded initialisation and save it with the tokenizer."""
    from tqdm import tqdm
    from transformers import Qwen2ForCausalLM

    config = demo_model_config(
        tokenizer, hidden_size=tiny_cfg.hidden_size, intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_hidden_layers, num_attention_heads=tiny_cfg.num_attention_heads,
        num_key_value_heads=tiny_cfg.num_key_value_heads, max_position_embeddings=tiny_cfg.max_position_embeddings)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    eos = tokenizer.eos_token_id
    stream = []
    for line in pretraining_corpus():
        stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [eos]
    n_chunks = len(stream) // seq_len
    data = torch.tensor(stream[: n_chunks * seq_len]).view(n_chunks, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="pretraining demo base", dynamic_ncols=True)
    for step in bar:
        batch = data[torch.randint(0, n_chunks, (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("demo base: %d tokens of ICD-10-CM text, %d steps, final LM loss %.3f",
             data.numel(), steps, loss.item())
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
