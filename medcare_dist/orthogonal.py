"""How far the alignment adapters have strayed into the knowledge subspace."""

import torch

from .adapters import OrthogonalLoRALinear
from .injection import adapter_layers
from .zero import gathered


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
        with gathered([layer.knowledge_A, layer.align_A]):
            worst = max(worst, layer_residual(layer))
    return worst
