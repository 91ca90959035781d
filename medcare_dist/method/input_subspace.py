"""The principal subspace of the knowledge data's inputs to each stage-2 layer, for input-space protection.

Orthogonality of the alignment A to rows(A_k) is a statement about parameters; what keeps the knowledge is
that the alignment adapter changes little on the inputs the knowledge tasks produce. GPM (Saha et al. 2021)
and InfLoRA keep an update out of the principal subspace of earlier tasks' layer inputs. Here: run the TAIA
model (the one stage 2 starts from) over stage-1 rows, accumulate each knowledge layer's input second moment
X^T X in float64, and keep the top eigenvectors that hold `energy` of it (at most `max_rank`).
"""

from __future__ import annotations

import torch

from medcare_dist.method.adapters import LoRALinear
from medcare_dist.method.injection import adapter_layers


@torch.no_grad()
def input_second_moments(model, batches) -> dict:
    """{layer name: X^T X [in, in] float64} over every token of `batches` at each Knowledge Aggregator layer.

    batches: dicts of model inputs; an "attention_mask" selects the real tokens (padding is left out).
    """
    layers = [(n, m) for n, m in adapter_layers(model, LoRALinear) if m.role == "knowledge"]
    if not layers:
        raise ValueError("input_second_moments: the model carries no Knowledge Aggregator layers")
    moments = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers}
    mask = {"tokens": None}

    def hook(name):
        def fn(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if mask["tokens"] is not None:
                x = x[mask["tokens"]]
            x = x.double().cpu()
            moments[name] += x.t() @ x
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        for batch in batches:
            am = batch.get("attention_mask")
            mask["tokens"] = None if am is None else am.reshape(-1).bool()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return moments


def principal_basis(moment: torch.Tensor, energy: float, max_rank: int) -> torch.Tensor:
    """Orthonormal [in, k]: the fewest top eigenvectors of `moment` holding >= `energy` of its trace, k <= max_rank."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    vals, vecs = torch.linalg.eigh(moment.double())
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
    total = float(vals.sum())
    if total <= 0 or max_rank <= 0:
        return vecs[:, :0].contiguous()
    share = torch.cumsum(vals, 0) / total
    k = int((share < energy - 1e-12).sum()) + 1
    return vecs[:, :min(k, max_rank)].contiguous()


def knowledge_input_bases(model, batches, energy: float, align_rank: int) -> dict:
    """{layer name: basis [in, k] float32} for every Knowledge Aggregator layer; k leaves the complement room for
    the layer's A_k rows and an alignment adapter of `align_rank`."""
    moments = input_second_moments(model, batches)
    ranks = {n: m.rank for n, m in adapter_layers(model, LoRALinear) if m.role == "knowledge"}
    return {name: principal_basis(m, energy, m.shape[0] - ranks[name] - align_rank).float()
            for name, m in moments.items()}
