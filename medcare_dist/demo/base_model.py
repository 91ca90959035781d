"""The embedded default backbone: a tiny Qwen2 model briefly pretrained on ICD-10-CM text and a little chat.

A frozen backbone with random weights cannot be steered by small adapters
(its embeddings and output head are noise), so the demo first gives the tiny
model what a real base LLM brings: every token of its vocabulary seen in use,
medical text it has read, and a few general chat skills. It is pretrained, all
parameters, as a plain language model on
- the tabular list's descriptions (no codes beside them),
- the codes alone, in shuffled lists (no descriptions beside them),
- short general conversations in the chat template (medcare_dist.eval.retention's
  general prompts with fixed answers, and a few that use the answer formats
  the stages ask for: "The answer is B.", JSON replies),
so it knows the words and the symbols but not which code means what: mapping
codes to descriptions is what stage 1 teaches. Without the code and chat
parts the frozen embedding and output rows of those tokens stay at their
random initialisation, and the adapters cannot learn the facts in the demo's
budget (docs/method.md). Then it is frozen like any downloaded checkpoint.
"""

import logging
import math

import torch

import random

from medcare_dist.demo.assets import DEFAULT_CATEGORIES, _icd, demo_model_config, select_codes
from medcare_dist.eval.retention import GENERAL_PROMPTS

log = logging.getLogger(__name__)

# The demo base's answers to the general prompts: the general skill the final model should keep.
GENERAL_ANSWERS = (
    "Keep a fixed schedule, set up a quiet workspace, and take short breaks.",
    "The capital of France is Paris.",
    "Buenos días, ¿cómo estás?",
    "Red leaves drift and fall / the cool wind carries them home / autumn says goodbye",
    "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.",
    "17 plus 25 is 42.",
    "Red, yellow and blue.",
    "A kind young woman goes to the royal ball with help from her fairy godmother. The prince finds her by the "
    "glass slipper she left behind.",
    "A leap year has 366 days.",
    "How about \"The Daily Grind\"?",
    "The opposite of 'ancient' is 'modern'.",
    "Dear neighbour, thank you so much for watering my plants while I was away. They look wonderful!",
    "Air scatters blue sunlight more than other colours, so the sky looks blue.",
    "Mercury, Venus, Earth, Mars and Jupiter.",
    "3 kilometres is 3000 metres.",
    "Yesterday I walked to the market.",
    "A librarian organises books and helps people find information.",
    "s[::-1]",
    "Water boils at 100 degrees Celsius at sea level.",
    "Try Ticket to Ride: the rules are simple and everyone can play together.",
    "Green is the calm, fresh colour of grass and leaves.",
    "The plural of 'mouse' is 'mice'.",
    "The waves roll in from far away, / the sea sings softly every day.",
    "Neither: they both weigh one kilogram.",
)

# General conversations in the answer formats the stages use, with nothing medical in them.
FORMAT_CONVERSATIONS = (
    ("Which option is a fruit?\nA. car\nB. apple\nC. chair\nD. road\nAnswer with A, B, C or D.",
     "The answer is B."),
    ("Which option is an animal?\nA. horse\nB. table\nC. river\nD. cloud\nAnswer with A, B, C or D.",
     "The answer is A."),
    ("Which number is even?\nA. 3\nB. 7\nC. 5\nD. 8\nAnswer with A, B, C or D.", "The answer is D."),
    ("Which word is a colour?\nA. run\nB. slow\nC. green\nD. under\nAnswer with A, B, C or D.",
     "The answer is C."),
    ("What is the hex code for the colour white?", "The code is #FFFFFF."),
    ("What is the country code of France?", "The code is FR."),
    ("Reply in JSON with code and term for the colour red.", '{"code": "#FF0000", "term": "red"}'),
    ("Reply in JSON with code and term for the country Italy.", '{"code": "IT", "term": "Italy"}'),
)


def pretraining_corpus(tokenizer=None, seed: int = 0) -> list[str]:
    """The base's pretraining texts, one per document (see the module docstring).

    Inclusion terms are left out (stage 2's held-out phrases), and no code ever stands beside its
    description. Without a tokenizer (no chat template) only the descriptions and code lists.
    """
    icd = _icd()
    lines = []
    for category in DEFAULT_CATEGORIES:
        lines.append(icd.get_description(category))
        lines += [icd.get_description(c) for c in icd.get_descendants(category)]
    rng = random.Random(f"demo-base-codes-{seed}")
    codes = select_codes() + list(DEFAULT_CATEGORIES)
    for _ in range(3):
        rng.shuffle(codes)
        lines += [" ".join(codes[i:i + 12]) for i in range(0, len(codes), 12)]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        pairs = list(zip(GENERAL_PROMPTS, GENERAL_ANSWERS)) + list(FORMAT_CONVERSATIONS)
        for prompt, answer in pairs:
            lines.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False))
    return lines


def build_demo_base(out_dir, tokenizer, tiny_cfg, seed: int, steps: int = 300, seq_len: int = 128,
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
    for line in pretraining_corpus(tokenizer, seed):
        stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [eos]
    data = torch.tensor(stream)
    # Windows start anywhere in the stream: fixed windows let a tiny model learn each text at one position
    # only (a conversation memorised mid-window is not recalled at the start of a prompt).
    windows = torch.arange(seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="pretraining demo base", dynamic_ncols=True)
    for step in bar:
        batch = data[torch.randint(0, len(stream) - seq_len + 1, (batch_size, 1), generator=gen) + windows]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("demo base: %d tokens of pretraining text (ICD-10-CM descriptions, codes, chat), %d steps, "
             "final LM loss %.3f",
             data.numel(), steps, loss.item())
    model.eval()
    from medcare_dist.export import prepare_for_release

    prepare_for_release(model, tokenizer)  # like every model directory a run writes: stops at <|im_end|>
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
