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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from medcare_dist.cluster.model_shape import (DTYPE_BYTES, PRESETS, GiB, ModelShape, PlanError,
                                              adapter_targets_select, build_model, load_model_shape,
                                              mark_persistent, unique_params)
from medcare_dist.cluster.zero3_replay import simulate_zero3_fetches, training_trace

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
    "memory_efficient_linear": True,  # zero.Init swaps F.linear for a wrapper that keeps every input
}


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
            z[key] = type(ZERO_DEFAULTS[key])(zo[key])
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
    from medcare_dist.training.ds_config import resolve_ds_config_path

    name = "zero2.json" if stage == 2 else ("zero3_offload.json" if offload else "zero3.json")
    path = resolve_ds_config_path(f"ds_configs/{name}")
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def activation_bytes_per_layer(shape: ModelShape, adapters, stage: int, tokens: int, w: int, batch: int,
                               seq: int, linear_keeps_inputs: bool = False) -> float:
    """Tensors one decoder layer keeps for its backward (training, SDPA/flash attention, the pipeline's modules:
    kernels.lora_linear, kernels.swiglu). Torch's frozen linear keeps only its weight, so an input counts only
    where an adapter reads it, unless linear_keeps_inputs: under ZeRO-3, DeepSpeed replaces F.linear with a
    wrapper that keeps every input (memory_efficient_linear, on by default; it keeps the weight as the
    parameter, so a released partition is not pinned). Layers that compute their base inside their own autograd
    Function do not go through F.linear. tests/test_cluster.py checks this against a real layer's saved
    tensors, both ways."""
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    qo, kvo = shape.num_attention_heads * d, shape.num_key_value_heads * d
    T = tokens

    def picks(targets, field, block, names):
        return [n for n in names if adapter_targets_select(targets, f"model.layers.0.{block}.{n}", field)]

    if stage == 1:
        attn = picks(adapters.attn_targets, "attn_targets", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
    else:
        attn = []  # merged into the backbone by the TAIA step
    mlp = picks(adapters.mlp_targets, "mlp_targets", "mlp", ("gate_proj", "up_proj", "down_proj"))
    # The base linear goes through F.linear (and, under the wrapper, keeps its input): plain linears, and a
    # stage-1 mixture with expert dropout (base and adapters apart); the rest run inside one Function.
    mixture_apart = stage == 1 and adapters.expert_dropout > 0

    def through_f_linear(name):
        return name not in attn and name not in mlp or (mixture_apart and name in mlp)

    def wrapper_keeps(names):
        return linear_keeps_inputs and any(through_f_linear(n) for n in names)
    in_features = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": qo, "gate_proj": h, "up_proj": h,
                   "down_proj": i}
    out_features = {"q_proj": qo, "k_proj": kvo, "v_proj": kvo, "o_proj": h, "gate_proj": i, "up_proj": i,
                    "down_proj": h}
    total = 2 * T * (h + 1) * 4                  # two RMSNorms: the fp32 input and a [T, 1] rsqrt
    total += 2 * T * d * 4                       # RoPE's cos and sin (one pair for all layers; small)
    qkv = ("q_proj", "k_proj", "v_proj")
    if set(attn) & set(qkv) or wrapper_keeps(qkv):
        total += T * h * w                       # attention input, shared by the q/k/v adapters
    # q, k (rotated), v and the output, kept by attention; the output is also o_proj's input (SDPA writes it
    # in [tokens, heads x head_dim] order, so the transpose before o_proj copies nothing)
    total += T * (2 * qo + 2 * kvo) * w
    total += batch * shape.num_attention_heads * seq * 4  # log-sum-exp
    # With expert dropout each stage-1 MLP adapter keeps its own dropped copy (below) instead of its input.
    mlp_keeps_inputs = not mixture_apart
    if mlp_keeps_inputs and set(mlp) & {"gate_proj", "up_proj"} or wrapper_keeps(("gate_proj", "up_proj")):
        total += T * h * w                       # MLP input, shared by the gate/up adapters
    total += 2 * T * i * w                       # gate and up outputs (silu_mul keeps only these)
    if mlp_keeps_inputs and "down_proj" in mlp or wrapper_keeps(("down_proj",)):
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
                                           work.seq_len,
                                           linear_keeps_inputs=stage3 and zero["memory_efficient_linear"])
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
    from medcare_dist.config import AdapterConfig, load_config
    from medcare_dist.training.ds_config import resolve_ds_config_path

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
        from medcare_dist.cluster.plan_measure import measure_main

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
