"""Few-shot prompts: K solved items of a dev source put before each item as earlier chat turns, seeded.

This is lm-eval's `--apply_chat_template --fewshot_as_multiturn`: every example is a user turn (its prompt)
and an assistant turn (its answer, written the way the item will be scored), then the item's own prompt.
The examples of an item are drawn with a generator seeded by the seed and the item's origin, so they do not
depend on the rank, the batch, the other items or the order of the pool; an item is never its own example.
"""

from __future__ import annotations

import random

from medcare_dist.eval.benchmarks import BenchmarkError, Item

DEFAULT_SEED = 1234  # lm-eval's default --fewshot_seed


def answer_text(item: Item, answer_prefix: str, target: str) -> str | None:
    """How a solved example answers: for MCQ the answer prefix and the gold option in the scored form
    ("The answer is B. <text>" for target "option"), else the reference reply; None when there is none."""
    from medcare_dist.eval.harness import option_separator

    if item.kind == "mcq":
        options = dict(item.options)
        if item.multi or len(item.gold) > 1:
            body = "".join(item.gold)
        elif target == "letter":
            body = item.gold[0]
        elif target == "text":
            body = options[item.gold[0]]
        else:
            body = f"{item.gold[0]}. {options[item.gold[0]]}"
        return answer_prefix + option_separator(answer_prefix) + body
    return item.reply


def add_fewshot(items: list[Item], pool: list[Item], k: int, *, seed: int = DEFAULT_SEED,
                answer_prefix: str | None = None, target: str = "option") -> None:
    """Give every item of `items` k examples from `pool` (in place): they precede its prompt as chat turns,
    after its system prompt, and their origins are recorded in item.fewshot."""
    from medcare_dist.eval.harness import ANSWER_PREFIX

    if k <= 0:
        return
    solved = []
    for shot in pool:
        prefix = ANSWER_PREFIX[shot.lang] if answer_prefix is None else answer_prefix
        text = answer_text(shot, prefix, target)
        if text is not None:
            solved.append((shot, text))
    solved.sort(key=lambda st: st[0].origin)  # the draw must not depend on the order the pool was read in
    for item in items:
        candidates = [(s, t) for s, t in solved if s.kind == item.kind and s.origin != item.origin]
        if len(candidates) < k:
            raise BenchmarkError(f"{item.origin}: --num-fewshot {k}, but the few-shot source has only "
                                 f"{len(candidates)} solved {item.kind} items other than this one")
        rng = random.Random(f"{seed}:{item.origin}")
        shots = rng.sample(candidates, k)
        system = [m for m in item.messages if m["role"] == "system"]
        turns = []
        for shot, text in shots:
            turns += [m for m in shot.messages if m["role"] != "system"]
            turns.append({"role": "assistant", "content": text})
        item.messages = system + turns + [m for m in item.messages if m["role"] != "system"]
        item.fewshot = [s.origin for s, _ in shots]
