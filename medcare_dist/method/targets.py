"""Which linear layers adapter targets select: short names, `all`, or regular expressions (no torch needed)."""

import re

# Where `all` looks: the linear layers inside a decoder layer's attention or MLP block, by the name of the
# block (Qwen2/Qwen3/Llama/Mistral: self_attn, mlp; other families: attention, attn, feed_forward, ffn).
SCOPES = {"attn_targets": ("self_attn", "attention", "attn"), "mlp_targets": ("mlp", "feed_forward", "ffn")}
_SHORT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def target_kind(target: str) -> str:
    """"all", "name" (a short module name such as q_proj, matched on every layer) or "regex" (anything
    else: a regular expression matched in full against the qualified name, PEFT's rule for a string)."""
    return "all" if target == "all" else "name" if _SHORT_NAME.fullmatch(target) else "regex"


def target_matches(target: str, qualified: str, field: str) -> bool:
    kind = target_kind(target)
    if kind == "all":
        return any(part in SCOPES[field] for part in qualified.split(".")[:-1])
    if kind == "name":
        return qualified.rpartition(".")[2] == target
    return re.fullmatch(target, qualified) is not None


def pattern_error(target: str) -> str | None:
    """What is wrong with a regular-expression target, or None."""
    if target_kind(target) != "regex":
        return None
    try:
        re.compile(target)
    except re.error as e:
        return f"not a valid regular expression ({e})"
    return None
