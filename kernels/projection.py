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

    From a rank-revealing SVD, so nearly dependent or rank-deficient rows
    yield a basis of the numerical row space only (singular values below
    rtol * the largest are dropped; rtol defaults to max(shape) * eps of the
    SVD's float64 (CPU) or float32 (GPU) arithmetic).
    """
    a = knowledge_A.detach().to(torch.float64 if knowledge_A.device.type == "cpu" else torch.float32)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    if rtol is None:
        # The tolerance of the computation, not of the input's dtype: the rows
        # as stored are what the layer uses, so a direction they span, however
        # weakly, is projected out too (at worst one extra direction of d_in).
        rtol = max(a.shape) * torch.finfo(a.dtype).eps
    keep = s > rtol * s.max().clamp_min(torch.finfo(a.dtype).tiny)
    return vh[keep].t().contiguous()


def project_out_torch(grad, basis):
    """grad - (grad Q) Q^T for grad [..., d_in] and Q [d_in, r] (PyTorch path)."""
    cdt = torch.promote_types(grad.dtype, torch.float32)      # 16-bit grads: project in fp32
    q = basis.to(cdt)
    g = grad.reshape(-1, grad.shape[-1]).to(cdt)
    out = torch.addmm(g, g @ q, q.t(), alpha=-1)               # G - (G Q) Q^T, one output buffer
    return out.to(grad.dtype).view(grad.shape)


class ProjectOut(torch.autograd.Function):
    """P(G) with P symmetric: the backward is the same projection (no gradient to the basis).

    `project(G, basis)` is the implementation: `project_out_torch` here, the
    Triton kernel in projection_triton.py.
    """

    @staticmethod
    def forward(ctx, grad, basis, project=project_out_torch):
        ctx.save_for_backward(basis)
        ctx.project = project
        return project(grad, basis)

    @staticmethod
    def backward(ctx, g):
        (basis,) = ctx.saved_tensors
        return ctx.project(g, basis), None, None


def project_out_knowledge(grad, knowledge_A=None, basis=None):
    """grad minus its component in rows(knowledge_A); differentiable in grad.

    Pass `basis` (from `orthonormal_basis`) to reuse a cached basis.
    """
    if use_triton(grad) and grad.dtype != torch.float64:
        from .projection_triton import project_out_knowledge_triton
        return project_out_knowledge_triton(grad, knowledge_A, basis=basis)
    if basis is None:
        basis = orthonormal_basis(knowledge_A)
    return ProjectOut.apply(grad, basis, project_out_torch)
