"""The model as the capacity planner counts it: published shapes, a config.json's shape, and the tree of
modules and parameters DeepSpeed sees in each stage (the recipe's adapters included)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Shapes from the published config.json files (Qwen1.5: DESIGN.md section 4). Qwen2/2.5 carry a q/k/v bias;
# Qwen3 and Llama-3 do not; the small ones tie the embedding and the output head.
_QWEN2 = dict(qkv_bias=True)
_NO_BIAS = dict(qkv_bias=False)
PRESETS = {
    "qwen1.5-1.8b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=151936),
    "qwen1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=151936),
    "qwen1.5-14b": dict(hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=152064),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN2),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN2),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, **_QWEN2),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN2),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, **_QWEN2),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True, **_NO_BIAS),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True, **_NO_BIAS),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, **_NO_BIAS),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, **_NO_BIAS),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, **_NO_BIAS),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, **_NO_BIAS),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, **_NO_BIAS),
}
# Qwen2.5 keeps Qwen2's shapes at these sizes.
PRESETS.update({f"qwen2.5-{size}": PRESETS[f"qwen2-{size}"] for size in ("0.5b", "1.5b", "7b")})


class PlanError(ValueError):
    """A request the planner cannot answer (unknown model, impossible sizes...)."""


@dataclass
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    head_dim: int = 0

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads


def load_model_shape(spec: str) -> ModelShape:
    """A preset name (qwen1.5-1.8b / 7b / 14b) or a local HF directory / config.json."""
    key = spec.lower()
    if key in PRESETS:
        return ModelShape(name=key, **PRESETS[key])
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"--model {spec}: neither a preset ({', '.join(PRESETS)}) nor a directory holding "
                        "config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: cannot read it as JSON ({e})") from None
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    try:
        heads = int(cfg["num_attention_heads"])
        model_type = str(cfg.get("model_type", ""))
        return ModelShape(
            name=str(path.parent), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2's q/k/v carry a bias by construction; Llama-style configs say so in attention_bias.
            qkv_bias=model_type.startswith("qwen2") or bool(cfg.get("attention_bias", False)),
            head_dim=int(cfg.get("head_dim") or 0))
    except KeyError as e:
        raise PlanError(f"{path}: missing {e.args[0]} (a decoder-only Hugging Face config is expected)") from None


@dataclass
class Param:
    name: str
    numel: int
    trainable: bool
    persist: bool = False
    uid: int = 0


@dataclass
class Module:
    name: str
    params: list = field(default_factory=list)    # direct parameters (all of them for a ZeRO-3 leaf module)
    children: list = field(default_factory=list)
    leaf: bool = False

    def all_params(self):
        out = list(self.params)
        for c in self.children:
            out += c.all_params()
        return out


def adapter_targets_select(targets, qualified: str, field: str) -> bool:
    """Whether adapter targets (short names, `all`, regular expressions) select this Qwen/Llama module."""
    from medcare_dist.method.targets import target_matches

    return any(target_matches(t, qualified, field) for t in targets)


def build_model(shape: ModelShape, adapters=None, stage: int = 1) -> tuple[Module, dict]:
    """The module tree of the model DeepSpeed sees in `stage` (1: attention LoRA + mixture-of-LoRA MLPs;
    2: merged attention, Knowledge Aggregator + alignment LoRA on the MLPs); and a name -> Module map."""
    from medcare_dist.config import AdapterConfig

    a = adapters if adapters is not None else AdapterConfig()
    h, inter, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q_out, kv_out = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    counter = iter(range(1 << 30))
    modules: dict[str, Module] = {}

    def P(name, numel, trainable=False):
        return Param(name, int(numel), trainable, uid=next(counter))

    def mod(name, params=(), children=(), leaf=False):
        m = Module(name, list(params), list(children), leaf)
        modules[name] = m
        return m

    def linear(name, d_in, d_out, bias, kind):
        base = [P(f"{name}.weight", d_in * d_out)] + ([P(f"{name}.bias", d_out)] if bias else [])
        if kind == "lora":
            r = a.attn_rank
            return mod(name, base + [P(f"{name}.lora_A", r * d_in, True), P(f"{name}.lora_B", d_out * r, True)],
                       leaf=True)
        if kind == "mixture":
            E, r, rk = a.num_experts, a.expert_rank, a.shared_rank
            return mod(name, base + [P(f"{name}.router.weight", E * d_in, True), P(f"{name}.router.bias", E, True),
                                     P(f"{name}.shared_A", rk * d_in, True), P(f"{name}.shared_B", d_out * rk, True),
                                     P(f"{name}.expert_A", E * r * d_in, True),
                                     P(f"{name}.expert_B", E * d_out * r, True)], leaf=True)
        if kind == "orthogonal":
            rk, ra = a.shared_rank, a.align_rank
            knowledge = not a.freeze_knowledge
            return mod(name, base + [P(f"{name}.knowledge_A", rk * d_in, knowledge),
                                     P(f"{name}.knowledge_B", d_out * rk, knowledge),
                                     P(f"{name}.align_A", ra * d_in, True),
                                     P(f"{name}.align_B", d_out * ra, True)], leaf=True)
        return mod(name, base)

    def kind_of(qualified):
        if stage == 1:
            if adapter_targets_select(a.attn_targets, qualified, "attn_targets"):
                return "lora"
            if adapter_targets_select(a.mlp_targets, qualified, "mlp_targets"):
                return "mixture"
        elif adapter_targets_select(a.mlp_targets, qualified, "mlp_targets"):
            return "orthogonal"
        return "plain"

    embed = mod("model.embed_tokens", [P("model.embed_tokens.weight", shape.vocab_size * h)])
    layers = []
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        attn = mod(f"{p}.self_attn", children=[
            linear(f"{p}.self_attn.q_proj", h, q_out, shape.qkv_bias, kind_of(f"{p}.self_attn.q_proj")),
            linear(f"{p}.self_attn.k_proj", h, kv_out, shape.qkv_bias, kind_of(f"{p}.self_attn.k_proj")),
            linear(f"{p}.self_attn.v_proj", h, kv_out, shape.qkv_bias, kind_of(f"{p}.self_attn.v_proj")),
            linear(f"{p}.self_attn.o_proj", q_out, h, False, kind_of(f"{p}.self_attn.o_proj"))])
        mlp = mod(f"{p}.mlp", children=[
            linear(f"{p}.mlp.gate_proj", h, inter, False, kind_of(f"{p}.mlp.gate_proj")),
            linear(f"{p}.mlp.up_proj", h, inter, False, kind_of(f"{p}.mlp.up_proj")),
            linear(f"{p}.mlp.down_proj", inter, h, False, kind_of(f"{p}.mlp.down_proj")),
            mod(f"{p}.mlp.act_fn")])
        layers.append(mod(p, children=[mod(f"{p}.input_layernorm", [P(f"{p}.input_layernorm.weight", h)]), attn,
                                       mod(f"{p}.post_attention_layernorm",
                                           [P(f"{p}.post_attention_layernorm.weight", h)]), mlp]))
    norm = mod("model.norm", [P("model.norm.weight", h)])
    backbone = mod("model", children=[embed, mod("model.rotary_emb"), *layers, norm])
    if shape.tie_word_embeddings:
        lm_head = mod("lm_head", [embed.params[0]])
    else:
        lm_head = mod("lm_head", [P("lm_head.weight", shape.vocab_size * h)])
    root = mod("", children=[backbone, lm_head])
    return root, modules


def unique_params(root: Module) -> list:
    seen, out = set(), []
    for p in root.all_params():
        if p.uid not in seen:
            seen.add(p.uid)
            out.append(p)
    return out


def mark_persistent(params, zero: dict, world: int):
    """ZeRO-3's rule: a parameter of at most `stage3_param_persistence_threshold` elements stays whole on every
    rank, while the running total stays under model_persistence_threshold / world."""
    threshold = zero["stage3_param_persistence_threshold"]
    budget = zero["model_persistence_threshold"] // max(1, world)
    used = 0
    for p in params:
        p.persist = p.numel <= threshold and used + p.numel <= budget
        if p.persist:
            used += p.numel
