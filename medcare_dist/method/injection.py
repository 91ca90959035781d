"""Puts the MedCare adapters into a Hugging Face decoder and folds them back out.

The steps of the method, in order: `add_stage1_adapters` (attention LoRA +
mixture-of-LoRA MLPs), `merge_attention_lora` (the TAIA step: attention LoRA
into the backbone, Noise Aggregator dropped, Knowledge Aggregator kept),
`add_stage2_adapters` (Knowledge Aggregator + orthogonal alignment LoRA),
`merge_all` (a plain dense model). Any model whose targeted projections are
nn.Linear works (Qwen2/Qwen1.5, Llama-style).
"""

import torch
import torch.nn as nn

from medcare_dist.method.adapters import LoRALinear, MixtureOfLoRALinear, OrthogonalLoRALinear, _AdapterBase
from medcare_dist.method.targets import pattern_error, target_matches


def adapter_layers(model: nn.Module, kind=_AdapterBase):
    """(qualified name, layer) of every adapter layer of type `kind`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]


def replace_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def resolve_targets(model: nn.Module, targets, field: str) -> tuple[list, list[str]]:
    """([(qualified name, linear)] the `field` targets select; problems naming each target that selects
    nothing or is not a valid regular expression). lm_head is never a target."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    # Target by target, each in model order: the order adapters are created in, and so their seeded
    # initialisation, stays what it was for lists of short names.
    chosen, seen, problems = [], set(), []
    for i, target in enumerate(targets):
        where = f"adapters.{field}[{i}]={target!r}"
        bad = pattern_error(target)
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        matched = [(n, m) for n, m in linears if target_matches(target, n, field)]
        if not matched:
            short = sorted({n.rpartition(".")[2] for n, _ in linears})
            problems.append(f"{where}: selects no nn.Linear of this model (its linear layers: {', '.join(short)}; "
                            "a target is a short name, `all`, or a regular expression on the full name)")
        chosen += [(n, m) for n, m in matched if n not in seen]
        seen.update(n for n, _ in matched)
    return chosen, problems


def _all_targets(model: nn.Module, cfg) -> tuple[dict[str, list], list[str]]:
    out, problems = {}, []
    for field in ("attn_targets", "mlp_targets"):
        out[field], found = resolve_targets(model, getattr(cfg, field), field)
        problems += found
    both = sorted({n for n, _ in out["attn_targets"]} & {n for n, _ in out["mlp_targets"]})
    if both:
        problems.append(f"adapters.attn_targets and adapters.mlp_targets both select {both[0]}"
                        + (f" (and {len(both) - 1} more)" if len(both) > 1 else "") + ": a layer takes one adapter")
    return out, problems


def resolved_targets(model: nn.Module, cfg) -> dict[str, list]:
    """{"attn_targets": [(name, linear)], "mlp_targets": [...]}; ValueError naming every problem (a target
    selecting nothing, a bad pattern, a layer selected for both adapters)."""
    out, problems = _all_targets(model, cfg)
    if problems:
        raise ValueError("\n".join(problems))
    return out


def describe_targets(targets: dict) -> str:
    """One line per adapter kind: how many layers, under which short names (for the log)."""
    from collections import Counter

    lines = []
    for field, what in (("attn_targets", "attention LoRA"), ("mlp_targets", "mixture-of-LoRA")):
        counts = Counter(n.rpartition(".")[2] for n, _ in targets[field])
        lines.append(f"{what} on {len(targets[field])} layers: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    return "; ".join(lines)


def check_adapter_fit(model: nn.Module, cfg) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the stage-1 and stage-2 adapter settings `cfg` on this model's shapes.

    Runs on a meta-device model before anything is computed. A problem names the recipe field: a target
    that selects no linear layer (resolve_targets), or an alignment rank the complement of the knowledge subspace
    (in_features - shared_rank) cannot hold. A rank above min(in, out) is only a warning: legal, but
    the extra rank adds parameters and no expressiveness.
    """
    targets, problems = _all_targets(model, cfg)  # the targets that resolve are checked on below
    warnings = []
    ranks = {"attn_targets": ("attn_rank",), "mlp_targets": ("expert_rank", "shared_rank")}
    for field, rank_fields in ranks.items():
        first_of_name = {}
        for qualified, lin in targets[field]:
            first_of_name.setdefault(qualified.rpartition(".")[2], (qualified, lin))
        for name, (qualified, lin) in first_of_name.items():  # every layer of one name has the same shape
            limit = min(lin.in_features, lin.out_features)
            for rf in rank_fields:
                if getattr(cfg, rf) > limit:
                    warnings.append(f"adapters.{rf}={getattr(cfg, rf)} exceeds min(in, out) = {limit} of "
                                    f"{qualified}")
            if field == "mlp_targets" and cfg.orthogonality in ("hard", "both"):
                room = lin.in_features - cfg.shared_rank
                if cfg.align_rank > room:
                    problems.append(
                        f"adapters.align_rank={cfg.align_rank}: stage 2 keeps the alignment LoRA of {name} "
                        f"orthogonal to the {cfg.shared_rank}-dimensional knowledge subspace of its "
                        f"{lin.in_features} inputs, which leaves room for rank {max(room, 0)} at most "
                        f"(or lower adapters.shared_rank)")
    return problems, warnings


def add_stage1_adapters(model: nn.Module, cfg) -> nn.Module:
    """Freeze the model; LoRA on attention targets, mixture-of-LoRA on MLP targets."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = resolved_targets(model, cfg)
    for name, lin in targets["attn_targets"]:
        replace_module(model, name, LoRALinear(lin, cfg.attn_rank, cfg.attn_alpha, cfg.attn_dropout, role="attention"))
    for name, lin in targets["mlp_targets"]:
        replace_module(model, name, MixtureOfLoRALinear(
            lin, cfg.expert_rank, cfg.expert_alpha, cfg.num_experts, cfg.top_k, cfg.shared_rank,
            cfg.expert_dropout, cfg.router_aux_loss_coef))
    return model


def _fold(layer) -> nn.Linear:
    """The layer's base linear with the adapter's dense update added to its weight."""
    base = layer.base
    with torch.no_grad():
        base.weight.add_(layer.delta_weight().to(base.weight.dtype))
    return base


@torch.no_grad()
def merge_attention_lora(model: nn.Module) -> nn.Module:
    """TAIA step: fold attention LoRA into the backbone; keep only the Knowledge Aggregator.

    Each MixtureOfLoRALinear becomes a LoRALinear(role="knowledge") holding its
    shared expert at the same scaling; routed experts and routers are dropped.
    """
    layers = adapter_layers(model, (LoRALinear, MixtureOfLoRALinear))
    if not layers:
        raise ValueError("merge_attention_lora: the model has no stage-1 adapters")
    for name, layer in layers:
        if isinstance(layer, LoRALinear):
            if layer.role == "attention":
                replace_module(model, name, _fold(layer))
            continue
        ka = LoRALinear(layer.base, layer.shared_rank, alpha=0.0, role="knowledge", scaling=layer.scaling)
        ka.lora_A.copy_(layer.shared_A)
        ka.lora_B.copy_(layer.shared_B)
        replace_module(model, name, ka)
    return model


@torch.no_grad()
def add_stage2_adapters(model: nn.Module, cfg, protected: dict | None = None) -> nn.Module:
    """Turn each Knowledge Aggregator into an OrthogonalLoRALinear with a new alignment LoRA.

    B_k is rescaled by (stage-1 scaling / stage-2 scaling) so the knowledge
    path's contribution, and hence the model's output, is unchanged at the
    start of stage 2 (the alignment B starts at zero). `protected`: {layer
    name: [in, k] basis of knowledge-input directions} (medcare_dist.method.input_subspace)
    the alignment A is also kept out of.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    layers = [(n, m) for n, m in adapter_layers(model, LoRALinear) if m.role == "knowledge"]
    if not layers:
        raise ValueError("add_stage2_adapters: the model carries no Knowledge Aggregator "
                         "(run merge_attention_lora on a stage-1 model, or load the stage-1 knowledge adapters)")
    stage2_scaling = cfg.align_alpha / cfg.align_rank
    for name, ka in layers:
        replace_module(model, name, OrthogonalLoRALinear(
            ka.base, ka.lora_A, ka.lora_B * (ka.scaling / stage2_scaling), cfg.align_rank, cfg.align_alpha,
            cfg.orthogonality, cfg.freeze_knowledge, cfg.orthogonality_lambda, cfg.attn_dropout,
            (protected or {}).get(name)))
    return model


@torch.no_grad()
def merge_all(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight: a plain model with the same outputs.

    A MixtureOfLoRALinear cannot be folded (its routed experts depend on the
    input); run merge_attention_lora first.
    """
    for name, layer in adapter_layers(model):
        if isinstance(layer, MixtureOfLoRALinear):
            raise ValueError(f"merge_all: {name} is a routed mixture-of-LoRA layer, which has no dense "
                             "equivalent; apply merge_attention_lora (the TAIA step) first")
        replace_module(model, name, _fold(layer))
    return model


def pop_expert_counts(model: nn.Module) -> dict:
    """Tokens routed to each expert per layer since the last call, then reset."""
    out = {}
    for name, layer in adapter_layers(model, MixtureOfLoRALinear):
        out[name] = layer.expert_counts.cpu().clone()
        layer.expert_counts.zero_()
    return out


def set_noise_aggregator_off(model: nn.Module, off: bool):
    """Switch every mixture layer's routed experts off (training only) for the next forward."""
    for _, layer in adapter_layers(model, MixtureOfLoRALinear):
        layer.noise_off = off


def set_penalty_grad_scale(model: nn.Module, scale: float):
    for _, layer in adapter_layers(model):
        layer.penalty_grad_scale = scale


def last_penalty_total(model: nn.Module) -> float:
    """Sum of the penalties (router balance, soft orthogonality) of the latest forward."""
    vals = [layer.last_penalty for _, layer in adapter_layers(model) if layer.last_penalty is not None]
    return float(sum(v.float() for v in vals)) if vals else 0.0


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put every adapter layer's base linear back, discarding the adapter."""
    for name, layer in adapter_layers(model):
        replace_module(model, name, layer.base)
    return model
