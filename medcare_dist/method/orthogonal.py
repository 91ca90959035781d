"""How far the alignment adapters have strayed into the knowledge subspace."""

import torch

from medcare_dist.method.adapters import OrthogonalLoRALinear
from medcare_dist.method.injection import adapter_layers
from medcare_dist.training.zero import gathered


@torch.no_grad()
def layer_residual(layer: OrthogonalLoRALinear) -> float:
    """|A_a Q|_F / |A_a|_F in float64, Q an orthonormal basis of rows(A_k)."""
    a_k = layer.knowledge_A.detach().double()
    a_a = layer.effective_align_A().detach().double()
    q = torch.linalg.qr(a_k.t())[0]
    norm = a_a.norm()
    return float((a_a @ q).norm() / norm) if norm > 0 else 0.0


def orthogonality_residual(model) -> float:
    """Max over stage-2 layers of |A_a Q|_F / |A_a|_F (0 = exactly orthogonal).

    Under ZeRO-3 this is a collective: every rank must call it.
    """
    worst = 0.0
    for _, layer in adapter_layers(model, OrthogonalLoRALinear):
        with gathered([t for t in (layer.knowledge_A, layer.align_A, layer.protected_basis) if t is not None]):
            worst = max(worst, layer_residual(layer))
    return worst


@torch.no_grad()
def knowledge_input_response(model, knowledge_batches, alignment_batches) -> float:
    """How much the alignment adapter responds to knowledge inputs, relative to alignment inputs.

    Mean over stage-2 layers of  (|X_k P(A_a)^T|_F / sqrt(T_k)) / (|X_a P(A_a)^T|_F / sqrt(T_a)),  X_k and
    X_a the layer's inputs on the knowledge and the alignment data (T tokens each), P(A_a) the alignment A
    that enters the forward. Orthogonality to rows(A_k) bounds the parameters, not this: a value near 1 means
    the alignment adapter moves knowledge-task activations as much as alignment-task ones. Single process.
    """
    layers = adapter_layers(model, OrthogonalLoRALinear)
    sums = {name: [0.0, 0, 0.0, 0] for name, _ in layers}
    which = {"split": 0}

    def hook(name, layer):
        def fn(_module, args):
            x = args[0].reshape(-1, layer.in_features).double()
            r = x @ layer.effective_align_A().double().t()
            acc = sums[name]
            acc[2 * which["split"]] += float(r.pow(2).sum())
            acc[2 * which["split"] + 1] += x.shape[0]
        return fn

    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers]
    try:
        for split, batches in ((0, knowledge_batches), (1, alignment_batches)):
            which["split"] = split
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    ratios = [((k / max(nk, 1)) / (a / max(na, 1))) ** 0.5 for k, nk, a, na in sums.values() if a > 0]
    return sum(ratios) / len(ratios) if ratios else 0.0
