"""Projection onto the orthogonal complement of the knowledge-adapter row space.

project_out_knowledge(G, A_k) = G - (G Q) Q^T, Q an orthonormal basis of
rows(A_k) ([d_in, r] columns). Linear and symmetric, so it is its own
gradient: applied to a parameter in the forward pass, autograd applies the
same projection to the parameter's gradient.
"""

import torch

from .dispatch import use_triton


def orthonormal_basis(knowledge_A, rtol=None):
    """Orthonormal basis Q [d_in, rank] of rows(knowledge_A [r_k, d_in]).

    Column-pivoted by a rank-revealing SVD, so nearly dependent or
    rank-deficient rows yield a basis of the numerical row space only.
    """
    a = knowledge_A.detach().to(torch.float64 if knowledge_A.device.type == "cpu" else torch.float32)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    if rtol is None:
        rtol = max(a.shape) * torch.finfo(a.dtype).eps
    keep = s > rtol * s.max().clamp_min(torch.finfo(a.dtype).tiny)
    return vh[keep].t().contiguous()


def project_out_torch(grad, basis):
    """grad - (grad Q) Q^T for grad [..., d_in] and Q [d_in, r] (PyTorch path)."""
    q = basis.to(grad.dtype)
    return grad - (grad @ q) @ q.t()


class _ProjectOut(torch.autograd.Function):
    """P(G) with P symmetric: the backward is the same projection."""

    @staticmethod
    def forward(ctx, grad, basis):
        ctx.save_for_backward(basis)
        return project_out_torch(grad, basis)

    @staticmethod
    def backward(ctx, g):
        (basis,) = ctx.saved_tensors
        return project_out_torch(g, basis), None


def project_out_knowledge(grad, knowledge_A=None, basis=None):
    """grad minus its component in rows(knowledge_A); differentiable in grad.

    Pass `basis` (from `orthonormal_basis`) to reuse a cached basis.
    """
    if use_triton(grad) and basis is None:
        from .projection_triton import project_out_knowledge_triton
        return project_out_knowledge_triton(grad, knowledge_A)
    if basis is None:
        basis = orthonormal_basis(knowledge_A)
    return _ProjectOut.apply(grad, basis)
