"""Mixture-of-LoRA linear layer: y = x W^T + b + s * (KA(x) + sum_topk g_e(x) E_e(x)).

Shrink-gate-expand: one GEMM of x against the stacked A's [A_k; A_1..A_E],
a per-token gate on its columns (1 for the Knowledge Aggregator, the
renormalised top-k router weight for a selected expert, 0 otherwise), one GEMM
against the stacked B's accumulated into the base output. No [E, T, out]
tensor is ever formed.
"""

import torch
import torch.nn.functional as F

from .dispatch import use_triton


def route_top_k(x, router_weight, router_bias, top_k):
    """Router softmax over experts, top-k, the k weights renormalised to sum 1.

    Returns (probs [T, E], topk_idx [T, k], topk_w [T, k]).
    """
    logits = F.linear(x, router_weight, router_bias)
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)
    topk_p, topk_idx = probs.topk(top_k, dim=-1)
    topk_w = topk_p / topk_p.sum(dim=-1, keepdim=True)
    return probs, topk_idx, topk_w


def mixture_lora_torch(x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                       expert_A, expert_B, top_k, scaling, adapter_x=None):
    """Plain-PyTorch shrink-gate-expand path (the CPU production path).

    x: [T, in] in the base dtype; weight: [out, in]; shared_A: [r_k, in];
    shared_B: [out, r_k]; expert_A: [E, r, in]; expert_B: [E, out, r].
    `weight=None` returns the adapter delta only. `adapter_x` (default x) is
    the adapter-path input, which differs from x only under LoRA dropout.
    """
    num_experts, rank, d_in = expert_A.shape
    adapter_dtype = expert_A.dtype
    xa = (x if adapter_x is None else adapter_x).to(adapter_dtype)
    T = xa.shape[0]
    r_k = shared_A.shape[0]

    _, topk_idx, topk_w = route_top_k(xa, router_weight, router_bias, top_k)
    gates = torch.zeros(T, num_experts, dtype=adapter_dtype, device=xa.device)
    gates = gates.scatter(1, topk_idx, topk_w)  # differentiable in topk_w

    a_stack = torch.cat([shared_A, expert_A.reshape(num_experts * rank, d_in)], dim=0)
    b_stack = torch.cat([shared_B, expert_B.permute(1, 0, 2).reshape(-1, num_experts * rank)], dim=1)
    h = xa @ a_stack.t()                                   # shrink: [T, r_k + E r]
    h_shared, h_experts = h.split([r_k, num_experts * rank], dim=1)
    h_experts = (h_experts.view(T, num_experts, rank) * gates.unsqueeze(-1)).view(T, -1)
    h_gated = torch.cat([h_shared, h_experts], dim=1)      # gate
    delta = (h_gated @ b_stack.t()) * scaling               # expand
    if weight is None:
        return delta
    base = F.linear(x, weight, bias)
    return base + delta.to(base.dtype)


def fused_mixture_lora(x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                       expert_A, expert_B, top_k, scaling):
    """The mixture-of-LoRA layer output for x [T, in]: Triton on CUDA, PyTorch elsewhere."""
    if use_triton(x, weight):
        from .mixture_lora_triton import mixture_lora_triton
        return mixture_lora_triton(x, weight, bias, router_weight, router_bias, shared_A,
                                   shared_B, expert_A, expert_B, top_k, scaling)
    return mixture_lora_torch(x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                              expert_A, expert_B, top_k, scaling)
