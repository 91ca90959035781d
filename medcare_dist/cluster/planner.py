"""Capacity planner for MedCare jobs on DeepSpeed ZeRO-2 / ZeRO-3.

    python launch/plan.py --model qwen1.5-14b --nodes 2 --gpus-per-node 8 --zero 3 --seq-len 3072 --micro-batch 4

For one training stage it predicts, per GPU:
  * memory: frozen backbone (partition + the gathered working set), adapter weights, the adapters'
    fp32 master copy and Adam moments, gradients, activations with and without gradient
    checkpointing, logits / loss, buffers;
  * bytes communicated per optimizer step: all-gather (ZeRO-3 parameter fetches, and the refresh
    of persistent parameters after the step) and reduce-scatter (adapter gradients);
  * step time and tokens/s for a given GPU throughput and link bandwidth;
and recommends a DeepSpeed config, or says that the job does not fit.

The parameter list is built exactly (from the Qwen1.5 shapes or a local config.json, and the
recipe's adapter settings). The ZeRO-3 all-gather volume is not a rule of thumb: the planner
replays DeepSpeed's parameter coordinator (fetch, prefetch, release with the reuse-distance
rule) over the module trace the training step produces, with and without gradient
checkpointing. docs/cluster.md records the check against DeepSpeed's comms logger.
Activation figures are estimates from the saved-tensor inventory of a Qwen2 decoder layer.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

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

# ZeRO knobs the planner reads; values are DeepSpeed's own defaults, the repo's JSON files override them.
ZERO_DEFAULTS = {
    "stage": 3,
    "stage3_param_persistence_threshold": 100000,
    "model_persistence_threshold": sys.maxsize,
    "stage3_prefetch_bucket_size": 50000000,
    "stage3_max_live_parameters": 1000000000,
    "stage3_max_reuse_distance": 1000000000,
    "reduce_bucket_size": 500000000,
    "allgather_bucket_size": 500000000,
}


class PlanError(ValueError):
    """A request the planner cannot answer (unknown model, impossible sizes...)."""


# --------------------------------------------------------------------------- the model


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


def _adapter_value(adapters, name, default):
    return getattr(adapters, name, default) if adapters is not None else default


def _selects(targets, qualified: str, field: str) -> bool:
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
            if _selects(a.attn_targets, qualified, "attn_targets"):
                return "lora"
            if _selects(a.mlp_targets, qualified, "mlp_targets"):
                return "mixture"
        elif _selects(a.mlp_targets, qualified, "mlp_targets"):
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


# --------------------------------------------------------------------------- ZeRO-3 parameter coordinator replay


def training_trace(modules: dict, n_layers: int, checkpointing: bool) -> list:
    """Module order of one forward + backward, as DeepSpeed's coordinator records it (checked against its trace)."""

    def layer_forward(i):
        p = f"model.layers.{i}"
        return [p, f"{p}.input_layernorm", f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", f"{p}.post_attention_layernorm", f"{p}.mlp",
                f"{p}.mlp.gate_proj", f"{p}.mlp.act_fn", f"{p}.mlp.up_proj", f"{p}.mlp.down_proj"]

    def layer_backward(i, with_container):
        p = f"model.layers.{i}"
        return ([p] if with_container else []) + [
            f"{p}.mlp", f"{p}.mlp.down_proj", f"{p}.mlp.up_proj", f"{p}.mlp.act_fn", f"{p}.mlp.gate_proj",
            f"{p}.post_attention_layernorm", f"{p}.self_attn", f"{p}.self_attn.o_proj", f"{p}.self_attn.v_proj",
            f"{p}.self_attn.k_proj", f"{p}.self_attn.q_proj", f"{p}.input_layernorm"]

    fwd = ["", "model", "model.embed_tokens", "model.rotary_emb"]
    for i in range(n_layers):
        fwd += layer_forward(i)
    fwd += ["model.norm", "lm_head"]
    bwd = ["", "lm_head", "model", "model.norm"]
    for i in reversed(range(n_layers)):
        if checkpointing:  # reentrant checkpointing re-runs the layer's forward inside the backward
            bwd += [(name, "recompute") for name in layer_forward(i)] + layer_backward(i, with_container=False)
        else:
            bwd += layer_backward(i, with_container=True)
    bwd += ["model.embed_tokens"]
    out = [(modules[n], "forward") for n in fwd]
    for item in bwd:
        name, phase = item if isinstance(item, tuple) else (item, "backward")
        out.append((modules[name], phase))
    return out


def simulate_zero3_fetches(trace, zero: dict) -> dict:
    """Replay DeepSpeed's PartitionedParameterCoordinator over one micro-step's trace (complete-trace mode).

    Returns the elements all-gathered per phase and the peak of gathered (non-persistent) elements.
    Mirrors: fetch of the module's unavailable parameters, prefetch of up to
    min(max_live - available, prefetch_bucket) elements further down the parameter trace, and release
    after the module unless the parameter was prefetched for a later use or reappears within
    max_reuse_distance elements of trace (counted over whole subtrees when the released module is a
    ZeRO-3 leaf, as DeepSpeed does). Under reentrant checkpointing, frozen parameters fetched by the
    recompute stay until the module's backward (DeepSpeed attributes them to the running backward).
    """
    prefetch_bucket = zero["stage3_prefetch_bucket_size"]
    max_live = zero["stage3_max_live_parameters"]
    max_reuse = zero["stage3_max_reuse_distance"]

    def params_of(module, recurse):
        return module.all_params() if recurse else list(module.params)

    param_order = []  # (param, step) in trace order, a module's parameters sorted by creation
    for step, (module, _) in enumerate(trace):
        for p in sorted({p.uid: p for p in params_of(module, module.leaf)}.values(), key=lambda p: p.uid):
            param_order.append((p, step))
    queue = deque(param_order)
    available: set = set()
    n_available = 0
    peak = 0
    most_recent = defaultdict(lambda: -10 ** 12)
    held: dict = {}  # uid -> module name whose backward releases it (checkpoint recompute)
    gathered = defaultdict(int)
    step_id = 0

    def gather(params, phase):
        nonlocal n_available, peak
        for p in params:
            if not p.persist and p.uid not in available:
                available.add(p.uid)
                n_available += p.numel
                gathered[phase] += p.numel
        peak = max(peak, n_available)

    def release(p):
        nonlocal n_available
        if p.uid in available:
            available.discard(p.uid)
            n_available -= p.numel

    for module, phase in trace:
        own = list({p.uid: p for p in params_of(module, module.leaf)}.values())
        gather(own, phase)
        not_fetched = {p.uid for p in own if most_recent[p.uid] < step_id}
        popped = set()
        while queue and len(popped) < len(not_fetched):
            p, at = queue.popleft()
            most_recent[p.uid] = at
            popped.add(p.uid)
        if prefetch_bucket > 0:
            budget = min(max_live - n_available, prefetch_bucket)
            numel, chosen = 0, {}
            while queue and numel < budget:
                p, at = queue.popleft()
                most_recent[p.uid] = max(most_recent[p.uid], at)
                if not p.persist and p.uid not in available and p.uid not in chosen:
                    chosen[p.uid] = p
                    numel += p.numel
            gather(chosen.values(), phase)
        step_id += 1
        # release after the module ran
        candidates = {p.uid: p for p in own if not p.persist}
        for uid in list(candidates):
            if most_recent[uid] > step_id:
                del candidates[uid]
        traversed = 0
        for later, _ in trace[step_id:]:
            if traversed >= max_reuse or not candidates:
                break
            for p in params_of(later, module.leaf):
                candidates.pop(p.uid, None)
                traversed += p.numel
        if phase == "recompute":
            # frozen parameters are attributed to the running backward: kept until this module's backward
            for p in own:
                if not p.persist and not p.trainable:
                    held[p.uid] = module.name
                    candidates.pop(p.uid, None)
        elif phase == "backward":
            for uid in [u for u, owner in held.items() if owner == module.name]:
                held.pop(uid)
                candidates[uid] = next(p for p in own if p.uid == uid)
        for uid, p in candidates.items():
            if uid not in held:
                release(p)
    return {"gathered": dict(gathered), "peak_gathered": peak}


# --------------------------------------------------------------------------- the plan


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    gpu_tflops: float = 400.0      # sustained dense bf16 TFLOP/s per GPU that the kernels reach
    intra_node_gbs: float = 150.0  # GB/s per GPU within a node (NVLink), effective bus bandwidth
    inter_node_gbs: float = 25.0   # GB/s per GPU across nodes (e.g. one 200 Gb/s NIC per GPU)
    pcie_gbs: float = 25.0         # GB/s host <-> GPU, for offload
    overlap: float = 0.7           # fraction of communication hidden behind compute (ZeRO-3 prefetch)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Workload:
    stage: int = 1
    seq_len: int = 3072
    micro_batch: int = 4
    global_batch: int = 128
    dtype: str = "bf16"
    gradient_checkpointing: bool = True
    device: str = "cuda"           # where the step runs: sets the loss's chunk size (cpu ranks: launch/bench_memory.py)
    loss_chunk_tokens: int = 0     # model.loss_chunk_tokens; 0: auto (1 GiB of fp32 logits on a GPU, 16 MiB on a CPU)


def zero_settings(ds_config: Optional[dict], stage: Optional[int] = None, offload: Optional[bool] = None) -> dict:
    """The ZeRO knobs of a DeepSpeed config dict (missing ones at DeepSpeed's defaults), with overrides."""
    z = dict(ZERO_DEFAULTS)
    zo = (ds_config or {}).get("zero_optimization", {})
    for key in ZERO_DEFAULTS:
        if key in zo and zo[key] != "auto":
            z[key] = int(zo[key])
    z["offload_param"] = zo.get("offload_param", {}).get("device", "none") == "cpu"
    z["offload_optimizer"] = zo.get("offload_optimizer", {}).get("device", "none") == "cpu"
    if stage is not None:
        z["stage"] = stage
    if offload is not None:
        z["offload_optimizer"] = offload
        z["offload_param"] = offload and z["stage"] == 3
    if z["stage"] != 3:
        z["offload_param"] = False
    return z


def repo_ds_config(stage: int, offload: bool) -> dict:
    from medcare_dist.config import resolve_ds_config_path

    name = "zero2.json" if stage == 2 else ("zero3_offload.json" if offload else "zero3.json")
    path = resolve_ds_config_path(f"ds_configs/{name}")
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def activation_bytes_per_layer(shape: ModelShape, adapters, stage: int, tokens: int, w: int, batch: int,
                               seq: int) -> float:
    """Tensors one decoder layer keeps for its backward (training, SDPA/flash attention, the pipeline's modules:
    kernels.lora_linear, kernels.swiglu). A frozen linear without an adapter keeps only its weight, so an input
    counts only where an adapter reads it; tests/test_cluster.py checks this against a real layer's saved
    tensors."""
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    qo, kvo = shape.num_attention_heads * d, shape.num_key_value_heads * d
    T = tokens

    def picks(targets, field, block, names):
        return [n for n in names if _selects(targets, f"model.layers.0.{block}.{n}", field)]

    if stage == 1:
        attn = picks(adapters.attn_targets, "attn_targets", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
    else:
        attn = []  # merged into the backbone by the TAIA step
    mlp = picks(adapters.mlp_targets, "mlp_targets", "mlp", ("gate_proj", "up_proj", "down_proj"))
    in_features = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": qo, "gate_proj": h, "up_proj": h,
                   "down_proj": i}
    out_features = {"q_proj": qo, "k_proj": kvo, "v_proj": kvo, "o_proj": h, "gate_proj": i, "up_proj": i,
                    "down_proj": h}
    total = 2 * T * (h + 1) * 4                  # two RMSNorms: the fp32 input and a [T, 1] rsqrt
    total += 2 * T * d * 4                       # RoPE's cos and sin (one pair for all layers; small)
    if set(attn) & {"q_proj", "k_proj", "v_proj"}:
        total += T * h * w                       # attention input, shared by the q/k/v adapters
    # q, k (rotated), v and the output, kept by attention; the output is also o_proj's input (SDPA writes it
    # in [tokens, heads x head_dim] order, so the transpose before o_proj copies nothing)
    total += T * (2 * qo + 2 * kvo) * w
    total += batch * shape.num_attention_heads * seq * 4  # log-sum-exp
    # With expert dropout each stage-1 MLP adapter keeps its own dropped copy (below) instead of its input.
    mlp_keeps_inputs = not (stage == 1 and adapters.expert_dropout > 0)
    if mlp_keeps_inputs and set(mlp) & {"gate_proj", "up_proj"}:
        total += T * h * w                       # MLP input, shared by the gate/up adapters
    total += 2 * T * i * w                       # gate and up outputs (silu_mul keeps only these)
    if mlp_keeps_inputs and "down_proj" in mlp:
        total += T * i * w                       # their product, the down_proj adapter's input
    if stage == 1:
        total += len(attn) * T * adapters.attn_rank * w  # x A^T of each attention LoRA
        if adapters.attn_dropout > 0:
            total += sum(T * in_features[n] for n in attn)  # 1-byte dropout masks
        E, k = adapters.num_experts, adapters.top_k
        width = adapters.shared_rank + E * adapters.expert_rank
        for n in mlp:
            total += 2 * T * width * w + 2 * T * E * 4 + T * k * 8  # shrink out, gated; router probs, top-k ids
            total += ((width + E) * in_features[n] + width * out_features[n]) * w  # the stacked adapter weights
            if not mlp_keeps_inputs:
                total += T * in_features[n] * (w + 1)  # dropped copy and its mask
    else:
        r = adapters.shared_rank + adapters.align_rank
        for n in mlp:
            total += T * r * w                   # x [A_k; A_a]^T
            total += (in_features[n] + out_features[n]) * r * w  # the stacked [A_k; A_a] and [B_k, B_a]
            if adapters.orthogonality in ("hard", "both"):
                total += in_features[n] * adapters.shared_rank * 8  # the fp64 basis of rows(A_k)
            if adapters.attn_dropout > 0:
                total += T * in_features[n]      # 1-byte dropout mask of the alignment LoRA
    return float(total)


def loss_bytes(tokens: int, shape: ModelShape, work: Workload, w: int = 4) -> float:
    """The chunked loss (medcare_dist.training.loss): one chunk's fp32 logits, softmax'd in place (with a
    16-bit lm_head, also its w-byte GEMM output and gradient copy), plus the gradient with respect to the hidden
    states (w bytes) it accumulates in the forward."""
    from medcare_dist.training.loss import auto_chunk_tokens

    chunk = work.loss_chunk_tokens or auto_chunk_tokens(shape.vocab_size, work.device)
    per_logit = 4 + (w if w < 4 else 0)
    return float(min(tokens, chunk) * shape.vocab_size * per_logit + tokens * shape.hidden_size * w)


def flops_per_token(shape: ModelShape, params: list, stage: int, seq: int, checkpointing: bool) -> float:
    """Training FLOPs per token: frozen matmuls need only the input gradient (1 + 1 passes, +1 recompute);
    adapter matmuls need input and weight gradients (1 + 2, +1 recompute); causal attention ~ 2 s h per layer."""
    frozen_mm = sum(p.numel for p in params if not p.trainable and p.name.endswith(".weight")
                    and "norm" not in p.name and "embed_tokens" not in p.name)
    if shape.tie_word_embeddings:
        frozen_mm += shape.vocab_size * shape.hidden_size
    adapter = sum(p.numel for p in params if p.trainable and "router.bias" not in p.name)
    attn = 2 * seq * shape.num_attention_heads * shape.head_dim * shape.num_hidden_layers
    recompute = 1 if checkpointing else 0
    return 2 * frozen_mm * (2 + recompute) + 2 * adapter * (3 + recompute) + attn * (3.5 + recompute)


def _ring_seconds(payload_bytes: float, world: int, gbs: float) -> float:
    if world <= 1 or payload_bytes <= 0:
        return 0.0
    return payload_bytes * (world - 1) / world / (gbs * 1e9)


def plan(shape: ModelShape, cluster: Cluster, work: Workload, zero: dict, adapters=None) -> dict:
    """Every figure for one configuration (a dict, JSON-ready)."""
    from medcare_dist.config import AdapterConfig

    adapters = adapters if adapters is not None else AdapterConfig()
    world = cluster.world
    if work.dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {work.dtype}: one of {', '.join(DTYPE_BYTES)}")
    w = DTYPE_BYTES[work.dtype]
    root, modules = build_model(shape, adapters, work.stage)
    params = unique_params(root)
    stage3 = zero["stage"] == 3
    mark_persistent(params, zero if stage3 else {**zero, "stage3_param_persistence_threshold": sys.maxsize},
                    world)

    def shard(n):
        return math.ceil(n / world)

    frozen = [p for p in params if not p.trainable]
    train = [p for p in params if p.trainable]
    n_frozen, n_train = sum(p.numel for p in frozen), sum(p.numel for p in train)
    per_micro_tokens = work.micro_batch * work.seq_len
    notes = []
    accum_exact = work.global_batch % (work.micro_batch * world) == 0
    accum = max(1, work.global_batch // (work.micro_batch * world))
    if not accum_exact:
        notes.append(f"global batch {work.global_batch} is not a multiple of micro {work.micro_batch} x "
                     f"{world} GPUs: the job would stop at start-up; the figures use accumulation {accum}")

    # ---- memory per GPU (bytes)
    mem = {}
    cpu = {}
    if stage3:
        frozen_part = sum(shard(p.numel) for p in frozen if not p.persist) * w
        frozen_pers = sum(p.numel for p in frozen if p.persist) * w
        if zero["offload_param"]:
            cpu["backbone partitions"] = frozen_part * cluster.gpus_per_node
            frozen_part = 0
        mem["backbone weights (own shard + persistent)"] = frozen_part + frozen_pers
        sims = {}
        for ckpt in (False, True):
            sims[ckpt] = simulate_zero3_fetches(training_trace(modules, shape.num_hidden_layers, ckpt), zero)
        sim = sims[work.gradient_checkpointing]
        mem["gathered parameters (ZeRO-3 working set)"] = sim["peak_gathered"] * w
        mem["adapter weights"] = (sum(p.numel for p in train if p.persist)
                                           + sum(shard(p.numel) for p in train if not p.persist)) * w
    else:
        sims = None
        mem["backbone weights (whole)"] = n_frozen * w
        mem["gathered parameters (ZeRO-3 working set)"] = 0
        mem["adapter weights"] = n_train * w
    opt_bytes = shard(n_train) * 12  # fp32 master + Adam m, v, partitioned by ZeRO-2 and -3
    grad_bytes = shard(n_train) * (w + 4) + min(zero["reduce_bucket_size"], n_train) * w
    if zero["offload_optimizer"]:
        cpu["adapter optimizer states"] = opt_bytes * cluster.gpus_per_node
        opt_bytes = 0
        grad_bytes = min(zero["reduce_bucket_size"], n_train) * w
    mem["adapter optimizer states (fp32 master, Adam m, v)"] = opt_bytes
    mem["adapter gradients (partition + reduce bucket)"] = grad_bytes
    per_layer = activation_bytes_per_layer(shape, adapters, work.stage, per_micro_tokens, w, work.micro_batch,
                                           work.seq_len)
    act_full = per_layer * shape.num_hidden_layers
    act_ckpt = per_micro_tokens * shape.hidden_size * w * shape.num_hidden_layers + per_layer
    logits = loss_bytes(per_micro_tokens, shape, work, w)
    mem["activations"] = act_ckpt if work.gradient_checkpointing else act_full
    mem["logits and loss (fp32 chunks of labelled positions)"] = logits
    mem["runtime overhead (CUDA context, allocator)"] = 1.5 * GiB
    total = sum(mem.values())
    total_other = total - mem["activations"]
    usable = cluster.gpu_mem_gib * GiB * 0.95
    memory = {
        "per_gpu_bytes": mem,
        "total_bytes": total,
        "activations_without_checkpointing_bytes": act_full,
        "activations_with_checkpointing_bytes": act_ckpt,
        "total_without_checkpointing_bytes": total_other + act_full,
        "total_with_checkpointing_bytes": total_other + act_ckpt,
        "gpu_bytes": cluster.gpu_mem_gib * GiB,
        "usable_bytes": usable,
        "fits": total <= usable,
        "cpu_bytes_per_node": cpu,
    }

    # ---- communication per optimizer step (payload = the whole gathered / reduced tensor)
    if stage3:
        gathered = sims[work.gradient_checkpointing]["gathered"]
        fetch_numel = sum(gathered.values())
        pers = [p for p in params if p.persist]
        # after the optimizer step every persistent parameter is all-gathered from its (padded) partitions
        post_step = sum(shard(p.numel) * world for p in pers) * w if world > 1 else 0
        ag_fetch = fetch_numel * w * accum if world > 1 else 0
        allgather = ag_fetch + post_step
        ag_detail = {"parameter fetches (forward, recompute, backward)": ag_fetch,
                     "persistent parameters after the step": post_step,
                     "fetched elements per micro-step by phase": gathered}
    else:
        allgather = n_train * w if world > 1 else 0  # updated 16-bit adapter partitions
        ag_detail = {"updated adapter weights after the step": allgather}
    reduce_scatter = n_train * w * accum if world > 1 else 0
    comm = {"all_gather_bytes": allgather, "reduce_scatter_bytes": reduce_scatter, "all_gather_detail": ag_detail,
            "per_gpu_wire_bytes": (allgather + reduce_scatter) * (world - 1) / world if world > 1 else 0}

    # ---- time
    f_tok = flops_per_token(shape, params, work.stage, work.seq_len, work.gradient_checkpointing)
    tokens_per_gpu = work.micro_batch * accum * work.seq_len
    t_compute = tokens_per_gpu * f_tok / (cluster.gpu_tflops * 1e12)
    bw = cluster.intra_node_gbs if cluster.nodes == 1 else min(cluster.intra_node_gbs, cluster.inter_node_gbs)
    t_comm = _ring_seconds(allgather + reduce_scatter, world, bw)
    if stage3 and zero["offload_param"]:
        t_comm += (fetch_numel / world) * w * accum / (cluster.pcie_gbs * 1e9)
    if zero["offload_optimizer"]:
        t_comm += 2 * shard(n_train) * 4 / (cluster.pcie_gbs * 1e9)
    hidden = min(cluster.overlap * t_comm, t_compute)
    t_step = t_compute + t_comm - hidden
    tokens_per_step = work.micro_batch * accum * world * work.seq_len
    timing = {"flops_per_token": f_tok, "compute_s": t_compute, "communication_s": t_comm,
              "link_gbs_used": bw, "step_s": t_step, "tokens_per_s": tokens_per_step / t_step if t_step else None,
              "tokens_per_step": tokens_per_step, "gradient_accumulation": accum}

    return {
        "model": asdict(shape),
        "stage": work.stage,
        "cluster": asdict(cluster) | {"world": world},
        "workload": asdict(work),
        "zero": {k: zero[k] for k in ("stage", "offload_param", "offload_optimizer",
                                      "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
                                      "stage3_max_live_parameters", "stage3_max_reuse_distance",
                                      "reduce_bucket_size")},
        "parameters": {"frozen": n_frozen, "trainable": n_train,
                       "persistent": sum(p.numel for p in params if p.persist and stage3),
                       "largest_adapter_tensor": max((p.numel for p in train), default=0),
                       "largest_backbone_tensor": max((p.numel for p in frozen), default=0),
                       "smallest_backbone_matrix": min((p.numel for p in frozen if p.name.endswith(".weight")
                                                        and "norm" not in p.name), default=0)},
        "memory": memory,
        "communication": comm,
        "time": timing,
        "notes": notes,
    }


def recommend(shape: ModelShape, cluster: Cluster, work: Workload, zero: dict, adapters=None,
              max_nodes: int = 64) -> dict:
    """The plan as asked plus, when it does not fit, the first change that makes it fit, and a ds_config."""
    asked = plan(shape, cluster, work, zero, adapters)
    result = {"plan": asked, "fits": asked["memory"]["fits"], "changes": [], "recommended": None}
    tries = []
    w = work
    if not w.gradient_checkpointing:
        tries.append(("turn on gradient checkpointing (model.gradient_checkpointing=true)",
                      cluster, Workload(**{**asdict(w), "gradient_checkpointing": True}), zero))
        w = Workload(**{**asdict(w), "gradient_checkpointing": True})
    mb = w.micro_batch
    while mb > 1:
        mb //= 2
        w2 = Workload(**{**asdict(w), "micro_batch": mb})
        tries.append((f"micro-batch {mb} (stageN.micro_batch_size={mb}; gradient accumulation grows)", cluster,
                      w2, zero))
    smallest = Workload(**{**asdict(w), "micro_batch": 1})
    if zero["stage"] == 2:
        tries.append(("ZeRO-3 (deepspeed.config=ds_configs/zero3.json)", cluster, smallest,
                      zero_settings(repo_ds_config(3, False), 3, False)))
    z3off = zero_settings(repo_ds_config(3, True), 3, True)
    tries.append(("ZeRO-3 with CPU offload (deepspeed.config=ds_configs/zero3_offload.json)", cluster, smallest,
                  z3off))
    for n in range(cluster.nodes + 1, max_nodes + 1):
        tries.append((f"{n} nodes", Cluster(**{**asdict(cluster), "nodes": n}), smallest, z3off))
    chosen = asked if asked["memory"]["fits"] else None
    if chosen is None:
        for why, c, wk, z in tries:
            p = plan(shape, c, wk, z, adapters)
            result["changes"].append({"change": why, "fits": p["memory"]["fits"],
                                      "total_gib": p["memory"]["total_bytes"] / GiB})
            if p["memory"]["fits"]:
                chosen = p
                break
    if chosen is not None:
        result["recommended"] = {"plan": chosen, "ds_config": recommended_ds_config(chosen)}
    return result


def recommended_ds_config(p: dict) -> dict:
    """A DeepSpeed JSON for the plan: the repo's config for its ZeRO stage with the persistence threshold fitted
    to this model (every adapter tensor whole, every backbone matrix partitioned) and the batch sizes filled in."""
    z = p["zero"]
    ds = copy.deepcopy(repo_ds_config(z["stage"], z["offload_optimizer"] or z["offload_param"]))
    zo = ds.setdefault("zero_optimization", {})
    par = p["parameters"]
    if z["stage"] == 3:
        largest, smallest = par["largest_adapter_tensor"], par["smallest_backbone_matrix"]
        threshold = int(math.ceil(largest / 100000.0) * 100000) if largest else zo.get(
            "stage3_param_persistence_threshold", 100000)
        if smallest and threshold >= smallest:
            threshold = max(1, smallest - 1)
        zo["stage3_param_persistence_threshold"] = threshold
    work = p["workload"]
    ds["train_micro_batch_size_per_gpu"] = work["micro_batch"]
    ds["gradient_accumulation_steps"] = p["time"]["gradient_accumulation"]
    ds["train_batch_size"] = work["micro_batch"] * p["time"]["gradient_accumulation"] * p["cluster"]["world"]
    ds["bf16"] = {"enabled": work["dtype"] == "bf16"}
    ds["fp16"] = {"enabled": work["dtype"] == "fp16"}
    return ds


# --------------------------------------------------------------------------- output


def _gib(b):
    return f"{b / GiB:8.2f} GiB"


def _bytes(b):
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def format_report(result: dict) -> str:
    p = result["plan"]
    m, c, t = p["memory"], p["communication"], p["time"]
    z, cl, wk = p["zero"], p["cluster"], p["workload"]
    off = " + CPU offload" if z["offload_optimizer"] or z["offload_param"] else ""
    lines = [
        f"model {p['model']['name']}  stage {p['stage']}  ZeRO-{z['stage']}{off}  "
        f"{cl['nodes']} node(s) x {cl['gpus_per_node']} GPU(s) = {cl['world']}  seq {wk['seq_len']}  "
        f"micro {wk['micro_batch']}  global {wk['global_batch']} (accumulation {t['gradient_accumulation']})  "
        f"{wk['dtype']}  checkpointing {'on' if wk['gradient_checkpointing'] else 'off'}",
        f"parameters: frozen {p['parameters']['frozen'] / 1e9:.3f} B, "
        f"trainable {p['parameters']['trainable'] / 1e6:.1f} M",
        "",
        f"{'per-GPU memory':<52}{'':>4}",
    ]
    for k, v in m["per_gpu_bytes"].items():
        lines.append(f"  {k:<50}{_gib(v)}")
    lines.append(f"  {'total':<50}{_gib(m['total_bytes'])}   of {m['gpu_bytes'] / GiB:.0f} GiB "
                 f"({'fits' if m['fits'] else 'DOES NOT FIT'})")
    lines.append(f"  {'activations without / with checkpointing':<50}"
                 f"{_gib(m['activations_without_checkpointing_bytes'])} / "
                 f"{m['activations_with_checkpointing_bytes'] / GiB:.2f} GiB")
    lines.append(f"  {'total without / with checkpointing':<50}{_gib(m['total_without_checkpointing_bytes'])} / "
                 f"{m['total_with_checkpointing_bytes'] / GiB:.2f} GiB")
    for k, v in m["cpu_bytes_per_node"].items():
        lines.append(f"  CPU memory per node, {k:<30}{_gib(v)}")
    lines += ["", "communication per optimizer step (payload)",
              f"  {'all-gather':<50}{_bytes(c['all_gather_bytes']):>12}",
              f"  {'reduce-scatter':<50}{_bytes(c['reduce_scatter_bytes']):>12}",
              f"  {'sent + received per GPU (ring)':<50}{_bytes(c['per_gpu_wire_bytes']):>12}",
              "", "time per optimizer step",
              f"  {'compute':<50}{t['compute_s']:10.3f} s   ({cl['gpu_tflops']:.0f} TFLOP/s per GPU)",
              f"  {'communication':<50}{t['communication_s']:10.3f} s   ({t['link_gbs_used']:.0f} GB/s per GPU)",
              f"  {'step (with overlap {:.0%})'.format(cl['overlap']):<50}{t['step_s']:10.3f} s",
              f"  {'tokens/s':<50}{t['tokens_per_s']:10.0f}"]
    for n in p["notes"]:
        lines.append(f"note: {n}")
    if not result["fits"]:
        lines += ["", "does not fit as asked; tried:"]
        for ch in result["changes"]:
            lines.append(f"  - {ch['change']}: {ch['total_gib']:.1f} GiB {'fits' if ch['fits'] else 'no'}")
    rec = result["recommended"]
    if rec is None:
        lines.append("no configuration tried fits: more GPU memory, shorter sequences or more nodes are needed")
    else:
        rp = rec["plan"]
        if not result["fits"]:
            lines.append(f"recommended: ZeRO-{rp['zero']['stage']}, {rp['cluster']['nodes']} node(s), micro "
                         f"{rp['workload']['micro_batch']}, checkpointing "
                         f"{'on' if rp['workload']['gradient_checkpointing'] else 'off'}: "
                         f"{rp['memory']['total_bytes'] / GiB:.1f} GiB per GPU, "
                         f"{rp['time']['tokens_per_s']:.0f} tokens/s")
        lines += ["", "recommended ds_config (--write-ds-config FILE saves it):",
                  json.dumps(rec["ds_config"], indent=2)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="launch/plan.py",
        description="Capacity planner for MedCare on DeepSpeed: per-GPU memory, bytes communicated per step, "
                    "predicted step time and tokens/s, a recommended ds_config. --measure checks the "
                    "communication figure against DeepSpeed's comms logger (run it under a launcher).")
    p.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or a local HF directory (config.json)")
    p.add_argument("--recipe", help="take adapters, batch sizes, dtype, checkpointing and ds config from a recipe")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1, help="training stage to plan (default 1)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--zero", type=int, choices=(2, 3), help="ZeRO stage (default: the ds config's, else 3)")
    p.add_argument("--offload", action="store_true", help="offload optimizer states (and, ZeRO-3, parameters) "
                                                          "to CPU")
    p.add_argument("--ds-config", help="DeepSpeed JSON to read ZeRO knobs from (default: the recipe's or the repo's)")
    p.add_argument("--persistence-threshold", type=int, help="override stage3_param_persistence_threshold")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: recipe data.max_length, else 3072)")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU per micro-step (default: recipe, else 4)")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: recipe, else 128)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="default: recipe's (auto = bf16), else bf16")
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--checkpointing", dest="ckpt", action="store_true", default=None,
                    help="gradient checkpointing on (default: recipe's, else on)")
    ck.add_argument("--no-checkpointing", dest="ckpt", action="store_false")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--gpu-tflops", type=float, default=400.0,
                   help="sustained TFLOP/s per GPU that training reaches (default 400, ~40%% of H100 bf16 peak)")
    p.add_argument("--intra-node-gbs", type=float, default=150.0, help="GB/s per GPU inside a node (default 150)")
    p.add_argument("--inter-node-gbs", type=float, default=25.0,
                   help="GB/s per GPU between nodes (default 25 = one 200 Gb/s NIC per GPU)")
    p.add_argument("--pcie-gbs", type=float, default=25.0, help="GB/s host <-> GPU for offload (default 25)")
    p.add_argument("--overlap", type=float, default=0.7,
                   help="fraction of communication hidden behind compute (default 0.7)")
    p.add_argument("--host-runtime-gib", type=float, default=None,
                   help="host memory of one rank before any model or data (default: 0.58, measured on CPU ranks; "
                        "a CUDA rank adds its libraries' host memory, so measure and pass it)")
    p.add_argument("--host-mem", type=float, default=None, metavar="GIB",
                   help="a node's host memory: say whether the job's host peak fits it")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--write-ds-config", metavar="FILE", help="write the recommended DeepSpeed JSON here")
    p.add_argument("--measure", action="store_true",
                   help="run stage-1 optimizer steps with DeepSpeed's comms logger and compare with the plan; "
                        "start it with a launcher, e.g. deepspeed --num_gpus 2 launch/plan.py --measure ...")
    p.add_argument("--steps", type=int, default=3, help="--measure: optimizer steps; the last one is logged")
    p.add_argument("--measure-out", metavar="FILE", help="--measure: write the comparison as JSON here")
    p.add_argument("--calibrate", action="store_true",
                   help="--measure: first time a large GEMM on every rank (-> --gpu-tflops) and an all-gather "
                        "of tens of MB (-> --intra-node-gbs), and plan with those rates, so that the predicted "
                        "step time is this machine's")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe overrides, dotted key=value (with --recipe)")
    return p


def _inputs(args):
    """(shape, cluster, workload, zero, adapters, cfg) from the command line."""
    from medcare_dist.config import AdapterConfig, load_config, resolve_ds_config_path

    cfg = load_config(args.recipe, args.overrides) if args.recipe else None
    if args.overrides and not args.recipe:
        raise PlanError("key=value overrides need --recipe")
    model = args.model or (cfg.model.path if cfg is not None else None)
    if not model:
        raise PlanError("--model is required (a preset or a local model directory)")
    shape = load_model_shape(model)
    stage_cfg = (cfg.stage1 if args.stage == 1 else cfg.stage2) if cfg is not None else None
    dtype = args.dtype or (cfg.model.dtype if cfg is not None else "bf16")
    dtype = "bf16" if dtype == "auto" else dtype
    ckpt = args.ckpt if args.ckpt is not None else (cfg.model.gradient_checkpointing if cfg is not None else True)
    work = Workload(stage=args.stage,
                    seq_len=args.seq_len or (cfg.data.max_length if cfg is not None else 3072),
                    micro_batch=args.micro_batch or (stage_cfg.micro_batch_size if stage_cfg else 4),
                    global_batch=args.global_batch or (stage_cfg.global_batch_size if stage_cfg else 128),
                    dtype=dtype, gradient_checkpointing=ckpt,
                    loss_chunk_tokens=cfg.model.loss_chunk_tokens if cfg is not None else 0)
    for name in ("seq_len", "micro_batch", "global_batch"):
        if getattr(work, name) <= 0:
            raise PlanError(f"--{name.replace('_', '-')} must be > 0")
    if args.nodes <= 0 or args.gpus_per_node <= 0:
        raise PlanError("--nodes and --gpus-per-node must be > 0")
    if args.ds_config:
        ds = json.loads(Path(args.ds_config).read_text())
    elif cfg is not None and args.zero is None and not args.offload:
        ds = json.loads(resolve_ds_config_path(cfg.deepspeed.config).read_text())
    else:
        ds = repo_ds_config(args.zero or 3, args.offload)
    zero = zero_settings(ds, args.zero, args.offload if args.offload else None)
    if args.persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = args.persistence_threshold
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem,
                      gpu_tflops=args.gpu_tflops, intra_node_gbs=args.intra_node_gbs,
                      inter_node_gbs=args.inter_node_gbs, pcie_gbs=args.pcie_gbs, overlap=args.overlap)
    adapters = cfg.adapters if cfg is not None else AdapterConfig()
    return shape, cluster, work, zero, adapters, cfg


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.measure:
        return measure_main(args)
    try:
        shape, cluster, work, zero, adapters, _ = _inputs(args)
        result = recommend(shape, cluster, work, zero, adapters)
        from medcare_dist.cluster.host_plan import host_memory

        chosen = result["recommended"]["plan"] if result["recommended"] else result["plan"]
        runtime = int(args.host_runtime_gib * GiB) if args.host_runtime_gib is not None else None
        result["host_memory"] = host_memory(chosen, "cuda", runtime)
        if args.host_mem is not None:
            result["host_memory"]["fits"] = result["host_memory"]["node_peak_bytes"] <= args.host_mem * GiB
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # config errors from load_config carry their own location
        if type(e).__name__ == "ConfigError":
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    if args.write_ds_config and result["recommended"] is not None:
        Path(args.write_ds_config).write_text(json.dumps(result["recommended"]["ds_config"], indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        from medcare_dist.cluster.host_plan import format_host_memory

        print(format_report(result))
        print("\n" + "\n".join(format_host_memory(result["host_memory"])))
        if "fits" in result["host_memory"]:
            print(f"  {'fits' if result['host_memory']['fits'] else 'DOES NOT FIT'} a node of {args.host_mem:.0f} GiB")
    fits = result["fits"] and result["host_memory"].get("fits", True)
    return 0 if fits else 3


# --------------------------------------------------------------------------- measurement (under a launcher)


def comms_bytes(summary: dict, world: int) -> dict:
    """Payload bytes per collective from deepspeed.comm.log_summary(return_dict=True)['summary'].

    The comms logger records the size of the argument named `tensor`: the local shard for
    all_gather_into_tensor / all_gather (so the payload is that times the world size) and the whole
    input for reduce_scatter_tensor.
    """
    out = defaultdict(int)
    for name, sizes in summary.items():
        op = name.split("|")[0].strip()
        for size, rec in sizes.items():
            total = int(size) * int(rec["count"])
            if op in ("all_gather_into_tensor", "all_gather", "allgather_fn"):
                out["all_gather_bytes"] += total * world
            elif op in ("reduce_scatter_tensor", "reduce_scatter", "reduce_scatter_fn"):
                out["reduce_scatter_bytes"] += total
            elif op not in ("log_summary_barrier", "barrier"):
                out[f"{op}_bytes"] += total
    return dict(out)


def measure_main(args):
    """Stage-1 steps on random tokens with DeepSpeed's comms logger; compares the last step with the plan."""
    import os
    import time

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as dcomm

    from medcare_dist.config import build_ds_config, load_config, resolve_dtype
    from medcare_dist.training.distributed import barrier, init_distributed
    from medcare_dist.method.injection import add_stage1_adapters
    from medcare_dist.training.modeling import (device_type, enable_gradient_checkpointing, load_base_model,
                                                use_fused_gated_mlp)
    from medcare_dist.training.trainer import token_loss_sum
    from medcare_dist.training.zero import mark_adapter_leaf_modules

    if args.stage != 1:
        print("error: --measure runs stage 1 only", file=sys.stderr)
        return 2
    rank, world = init_distributed()
    cfg = load_config(args.recipe or "demo",
                      args.overrides)
    model_path = args.model or cfg.model.path
    if not model_path or not Path(model_path).is_dir():
        model_path = _demo_model_dir(cfg, rank, barrier)
    args.model = str(model_path)
    dtype = resolve_dtype(args.dtype or cfg.model.dtype, device_type())
    args.dtype = dtype
    calibration = calibrate_rates(dtype, world) if args.calibrate else None
    if args.micro_batch:
        cfg.stage1.micro_batch_size = args.micro_batch
    if args.global_batch:
        cfg.stage1.global_batch_size = args.global_batch
    seq = args.seq_len or min(cfg.data.max_length, 128)
    ds = build_ds_config(cfg, cfg.stage1, world, dtype)
    if args.zero is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero
    if args.persistence_threshold is not None:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    model = load_base_model(model_path, dtype, cfg.model.attn_implementation, ds, cfg.model.trust_remote_code)
    torch.manual_seed(cfg.seed)
    add_stage1_adapters(model, cfg.adapters)
    use_fused_gated_mlp(model)  # as the pipeline trains it
    ckpt = args.ckpt if args.ckpt is not None else cfg.model.gradient_checkpointing
    if ckpt:
        enable_gradient_checkpointing(model)
    model.enable_input_require_grads()
    mark_adapter_leaf_modules(model, ds)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4), config=ds)
    engine.train()
    dcomm.configure(enabled=True, prof_all=True)
    accum = ds["gradient_accumulation_steps"]
    micro = ds["train_micro_batch_size_per_gpu"]
    vocab = engine.module.config.vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_last = 0.0
    for step in range(max(1, args.steps)):
        if step == max(1, args.steps) - 1:
            dcomm.reset_log()
            t0 = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, seq), generator=gen).to(engine.device)
            out = engine(input_ids=ids, attention_mask=torch.ones_like(ids))
            engine.backward(token_loss_sum(out.logits, ids) / ids.numel())
            engine.step()
        t_last = time.perf_counter() - t0 if step == max(1, args.steps) - 1 else t_last
    summary = dcomm.log_summary(return_dict=True)["summary"]
    measured = comms_bytes(summary, world)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    static = _static_memory(engine)
    barrier()
    if rank != 0:
        return 0

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = max(1, world // max(1, local))
    shape = load_model_shape(str(model_path))
    zero = zero_settings(ds)
    work = Workload(stage=1, seq_len=seq, micro_batch=micro, global_batch=ds["train_batch_size"], dtype=dtype,
                    gradient_checkpointing=bool(ckpt))
    cluster = measured_cluster(args, nodes, world // nodes, calibration)
    predicted = plan(shape, cluster, work, zero, cfg.adapters)
    pc, pm = predicted["communication"], predicted["memory"]["per_gpu_bytes"]
    rows = []
    for key in ("all_gather_bytes", "reduce_scatter_bytes"):
        want, got = pc[key], measured.get(key, 0)
        rows.append({"collective": key.replace("_bytes", ""), "predicted": want, "measured": got,
                     "ratio": (got / want) if want else (1.0 if not got else float("inf"))})
    mem_rows = [
        {"what": "backbone weights (own shard + persistent)",
         "predicted": pm["backbone weights (own shard + persistent)"], "measured": static["frozen_bytes"]},
        {"what": "adapter weights", "predicted": pm["adapter weights"],
         "measured": static["trainable_bytes"]},
        {"what": "adapter optimizer states (fp32 master, Adam m, v)",
         "predicted": pm["adapter optimizer states (fp32 master, Adam m, v)"], "measured": static["optimizer_bytes"]},
    ]
    if peak is not None:
        mem_rows.append({"what": "peak allocated (total)", "predicted": predicted["memory"]["total_bytes"],
                         "measured": peak})
    pt = predicted["time"]
    step_time = {"predicted_s": pt["step_s"], "predicted_compute_s": pt["compute_s"],
                 "predicted_communication_s": pt["communication_s"], "measured_s": t_last,
                 "ratio": t_last / pt["step_s"] if pt["step_s"] else None,
                 "tokens_per_step": pt["tokens_per_step"], "rates": {"gpu_tflops": cluster.gpu_tflops,
                                                                     "link_gbs": pt["link_gbs_used"],
                                                                     "overlap": cluster.overlap}}
    report = {"model": str(model_path), "world": world, "seq_len": seq, "micro_batch": micro,
              "gradient_accumulation": accum, "dtype": dtype, "gradient_checkpointing": bool(ckpt),
              "zero": predicted["zero"], "communication": rows, "memory": mem_rows,
              "other_collectives": {k: v for k, v in measured.items()
                                    if k not in ("all_gather_bytes", "reduce_scatter_bytes")},
              "step_seconds_measured": t_last, "step_time": step_time, "calibration": calibration,
              "comms_log": summary}
    print(f"comms per optimizer step, measured by DeepSpeed's comms logger vs planned ({world} ranks, "
          f"ZeRO-{zero['stage']}, persistence threshold {zero['stage3_param_persistence_threshold']}, "
          f"checkpointing {'on' if ckpt else 'off'})")
    for r in rows:
        print(f"  {r['collective']:<16} predicted {r['predicted']:>14,d} B   measured {r['measured']:>14,d} B   "
              f"ratio {r['ratio']:.4f}")
    print("memory per rank (static parts)")
    for r in mem_rows:
        print(f"  {r['what']:<52} predicted {r['predicted']:>14,.0f} B   measured {r['measured']:>14,.0f} B")
    if calibration is not None:
        print(f"calibration: {calibration['gemm']['tflops']:.3f} TFLOP/s per rank ({calibration['gemm']['n']}^3 "
              f"{dtype} GEMM, {calibration['gemm']['threads']} threads, slowest rank), all-gather "
              f"{calibration['all_gather']['bus_gbs']:.2f} GB/s bus ({calibration['all_gather']['payload_bytes']:,d} B"
              f" gathered, {world} ranks)")
    print(f"optimizer step: predicted {step_time['predicted_s']:.3f} s (compute {pt['compute_s']:.3f} s at "
          f"{cluster.gpu_tflops:.3f} TFLOP/s, communication {pt['communication_s']:.3f} s at "
          f"{pt['link_gbs_used']:.2f} GB/s, {cluster.overlap:.0%} of it hidden), measured {t_last:.3f} s, "
          f"ratio {step_time['ratio']:.2f}")
    if args.measure_out:
        Path(args.measure_out).write_text(json.dumps(report, indent=1, default=str))
    return 0


def calibrate_rates(dtype: str, world: int, gemm_n: int = 2048, gather_bytes: int = 32 * 2**20,
                    repeats: int = 3) -> dict:
    """This machine's rates for plan(), measured on every rank at once, as training runs them: a square GEMM
    of the training dtype with the rank's own threads, and an all-gather through deepspeed.comm (the path
    ZeRO-3's parameter fetches take) of gather_bytes in all. Each figure is the slowest rank's (a synchronous
    step waits for it)."""
    import time

    import deepspeed.comm as dcomm
    import torch
    from deepspeed.accelerator import get_accelerator

    from medcare_dist.training.modeling import TORCH_DTYPES

    device = get_accelerator().current_device_name()
    torch_dtype = TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(gemm_n, gemm_n, generator=gen).to(device, torch_dtype)
    b = torch.randn(gemm_n, gemm_n, generator=gen).to(device, torch_dtype)

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dcomm.all_reduce(t, op=dcomm.ReduceOp.MAX)
        return float(t.item())

    def timed(fn) -> float:
        fn()  # warm-up: first-call allocation and, for the collective, connection set-up
        get_accelerator().synchronize()
        dcomm.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        get_accelerator().synchronize()
        return slowest((time.perf_counter() - t0) / repeats)

    gemm_s = timed(lambda: torch.mm(a, b))
    shard = torch.ones(max(1, gather_bytes // (4 * world)), dtype=torch.float32, device=device)
    gathered = torch.empty(shard.numel() * world, dtype=torch.float32, device=device)
    gather_s = timed(lambda: dcomm.all_gather_into_tensor(gathered, shard))
    payload = gathered.numel() * gathered.element_size()
    return {"gemm": {"n": gemm_n, "dtype": dtype, "threads": torch.get_num_threads(), "seconds": gemm_s,
                     "tflops": 2 * gemm_n ** 3 / gemm_s / 1e12},
            "all_gather": {"payload_bytes": payload, "world": world, "seconds": gather_s,
                           "bus_gbs": bus_gbs(payload, world, gather_s)}}


def bus_gbs(payload_bytes: float, world: int, seconds: float) -> float:
    """The link rate (GB/s) at which plan()'s ring model (_ring_seconds) moves payload_bytes in seconds."""
    if world <= 1:
        return float("inf")
    return payload_bytes * (world - 1) / world / seconds / 1e9


def measured_cluster(args, nodes: int, gpus_per_node: int, calibration: Optional[dict]) -> Cluster:
    """The Cluster --measure plans with: the command line's rates, or, calibrated, the measured GEMM rate as
    gpu_tflops and the measured all-gather rate as the link (intra- and, as it spans every rank, inter-node)."""
    tflops, intra, inter = args.gpu_tflops, args.intra_node_gbs, args.inter_node_gbs
    if calibration is not None:
        tflops = calibration["gemm"]["tflops"]
        intra = inter = calibration["all_gather"]["bus_gbs"]
    return Cluster(nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=args.gpu_mem, gpu_tflops=tflops,
                   intra_node_gbs=intra, inter_node_gbs=inter, pcie_gbs=args.pcie_gbs, overlap=args.overlap)


def _static_memory(engine) -> dict:
    """Bytes this rank holds for parameters (partitions + persistent) and the optimizer's fp32 state."""
    from medcare_dist.training.host_memory import engine_tensor_bytes

    held = engine_tensor_bytes(engine)
    trainable = 0
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        shard = getattr(p, "ds_tensor", None)
        if shard is None or getattr(p, "ds_persist", False):  # whole on this rank (persistent, or not ZeRO-3)
            trainable += getattr(p, "ds_numel", p.numel()) * p.element_size()
        else:
            trainable += shard.numel() * shard.element_size()
    return {"frozen_bytes": held["backbone partitions"] + held["backbone whole tensors (persistent or unpartitioned)"],
            "trainable_bytes": trainable,
            "optimizer_bytes": held["adapter fp32 master partitions"] + held["Adam moments"]}


def _demo_model_dir(cfg, rank, barrier) -> Path:
    """The embedded tiny demo model for --measure without a model path (built once, as the pipeline does)."""
    demo_dir = Path(cfg.output_dir) / "demo_assets"
    target = demo_dir / "base_model"
    if rank == 0 and not (target / "config.json").is_file():
        import shutil

        from medcare_dist.demo.assets import prepare_demo
        from medcare_dist.demo.base_model import build_demo_base

        assets = prepare_demo(demo_dir, seed=cfg.data.demo_seed)
        tmp = demo_dir / ".base_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_base(tmp, assets.tokenizer(), cfg.model.tiny, cfg.seed)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    barrier()
    return target
