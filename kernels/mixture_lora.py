"""Mixture-of-LoRA linear layer: y = x W^T + b + s * (KA(x) + sum_topk g_e(x) E_e(x)).

Shrink-gate-expand: one GEMM of x against the stacked A's [A_k; A_1..A_E],
a per-token gate on its columns (1 for the Knowledge Aggregator, the
renormalised top-k router weight for a selected expert, 0 otherwise), one GEMM
against the stacked B's accumulated into the base output. No [E, T, out]
tensor is ever formed.

The PyTorch path is a custom autograd Function: the forward saves x, the
ungated and gated shrink outputs H and H_g ([T, r_k + E r], small) and the
router's probabilities, and the backward runs the small GEMMs directly
(dX = dY W + dH A_stack + dlogits W_r accumulated in place into one buffer),
so no [T, out] temporary beyond the output itself is ever allocated when the
base and adapter dtypes agree.
"""

import torch
import torch.nn.functional as F

from .dispatch import use_triton


def _routing_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def route_top_k(x, router_weight, router_bias, top_k):
    """Router softmax over experts, top-k, the k weights renormalised to sum 1.

    The logits and the softmax are computed in float32 (float64 for float64
    inputs) whatever the adapter dtype, and the top-k is taken on those
    probabilities, so a 16-bit model routes like its float32 counterpart.
    Returns (probs [T, E], topk_idx [T, k], topk_w [T, k]) in x's dtype
    (probs and weights differentiable w.r.t. the router and x).
    """
    rdt = _routing_dtype(x.dtype)
    logits = F.linear(x.to(rdt), router_weight.to(rdt), None if router_bias is None else router_bias.to(rdt))
    probs = torch.softmax(logits, dim=-1)
    topk_p, topk_idx = probs.topk(top_k, dim=-1)
    topk_w = topk_p / topk_p.sum(dim=-1, keepdim=True)
    return probs.to(x.dtype), topk_idx, topk_w.to(x.dtype)


def _stack_a(shared_A, expert_A, router_weight=None):
    """[A_k; A_1..A_E (; W_r)]: [r_k + E r (+ E), in]."""
    num_experts, rank, d_in = expert_A.shape
    r_k = shared_A.shape[0]
    rows = r_k + num_experts * rank + (0 if router_weight is None else router_weight.shape[0])
    out = torch.empty(rows, d_in, dtype=expert_A.dtype, device=expert_A.device)
    out[:r_k].copy_(shared_A)
    out[r_k:r_k + num_experts * rank].view(num_experts, rank, d_in).copy_(expert_A)
    if router_weight is not None:
        out[r_k + num_experts * rank:].copy_(router_weight)
    return out


def _stack_b_t(shared_B, expert_B):
    """[B_k, B_1, .., B_E]^T: [r_k + E r, out] (the row-major layout the GEMMs want)."""
    num_experts, d_out, rank = expert_B.shape
    r_k = shared_B.shape[1]
    out = torch.empty(r_k + num_experts * rank, d_out, dtype=expert_B.dtype, device=expert_B.device)
    out[:r_k].copy_(shared_B.t())
    out[r_k:].view(num_experts, rank, d_out).copy_(expert_B.transpose(1, 2))
    return out


class _MixtureLoRATorch(torch.autograd.Function):
    """Shrink-gate-expand forward and a backward from the saved H (PyTorch ops).

    When the router shares the adapters' (32/64-bit) dtype its weight is
    stacked under the A's, so one GEMM yields [H, logits] and one GEMM each
    gives the A's and the router's gradients; 16-bit adapters route in fp32.
    """

    @staticmethod
    def forward(ctx, x, xa, weight, bias, router_weight, router_bias, shared_A, shared_B, expert_A, expert_B,
                top_k, scaling, routed_mask):
        num_experts, rank, d_in = expert_A.shape
        r_k = shared_A.shape[0]
        R = r_k + num_experts * rank
        adt = expert_A.dtype
        separate_xa = xa is not None
        xa = (x if xa is None else xa).to(adt)
        T = xa.shape[0]
        rdt = _routing_dtype(adt)
        fold = router_weight.dtype == adt == rdt

        a_ext = _stack_a(shared_A, expert_A, router_weight if fold else None)   # [R (+E), in]
        b_stack_t = _stack_b_t(shared_B, expert_B)                              # [R, out]
        h_ext = xa @ a_ext.t()                                                  # shrink [T, R (+E)]
        if fold:
            h, logits = h_ext[:, :R], h_ext[:, R:]
            if router_bias is not None:
                logits = logits + router_bias.to(rdt)
        else:
            h = h_ext
            logits = F.linear(xa.to(rdt), router_weight.to(rdt),
                              None if router_bias is None else router_bias.to(rdt))
        probs = torch.softmax(logits, dim=-1)
        topk_p, topk_idx = probs.topk(top_k, dim=-1)
        topk_w = topk_p / topk_p.sum(dim=-1, keepdim=True)
        gates = torch.zeros(T, num_experts, dtype=rdt, device=xa.device).scatter_(1, topk_idx, topk_w)
        if routed_mask is not None:
            # Tokens whose Noise Aggregator is switched off: the routed gates are 0, the KA stays on.
            gates.mul_(routed_mask.to(rdt).unsqueeze(-1))

        h_g = h.clone()                                                         # gate
        h_g[:, r_k:].view(T, num_experts, rank).mul_(gates.to(adt).unsqueeze(-1))

        if weight is None:
            y = torch.mm(h_g, b_stack_t)
            y.mul_(scaling)
        elif weight.dtype == adt and x.dtype == adt:
            # Expand accumulated into the base GEMM's output: no [T, out] temporary.
            y = F.linear(x, weight, bias)
            y.addmm_(h_g, b_stack_t, alpha=scaling)
        else:
            y = F.linear(x, weight, bias)
            delta = torch.mm(h_g, b_stack_t)
            delta.mul_(scaling)
            y.add_(delta.to(y.dtype))
            del delta

        ctx.scaling, ctx.r_k, ctx.fold = scaling, r_k, fold
        ctx.shapes = (num_experts, rank, d_in)
        ctx.separate_xa = separate_xa
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(x if weight is not None else None, xa, weight, router_weight, a_ext, b_stack_t,
                              h, h_g, probs, gates, topk_idx, routed_mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, router_weight, a_ext, b_stack_t, h, h_g, probs, gates, topk_idx, routed_mask = \
            ctx.saved_tensors
        num_experts, rank, d_in = ctx.shapes
        r_k, s, fold = ctx.r_k, ctx.scaling, ctx.fold
        R = r_k + num_experts * rank
        T = xa.shape[0]
        adt = a_ext.dtype
        n_x, n_xa, n_w, n_b, n_rw, n_rb, n_sa, n_sb, n_ea, n_eb = ctx.needs_input_grad[:10]
        dy = dy.contiguous()
        dya = dy if dy.dtype == adt else dy.to(adt)

        # dB_stack^T = s H_g^T dY  [R, out]; split into the shared and the expert blocks.
        d_sb = d_eb = None
        if n_sb or n_eb:
            db_t = torch.mm(h_g.t(), dya)
            db_t.mul_(s)
            d_sb = db_t[:r_k].t().contiguous() if n_sb else None
            d_eb = db_t[r_k:].view(num_experts, rank, -1).transpose(1, 2).contiguous() if n_eb else None
            del db_t

        # dH_ext = [dH, dlogits]: dH_g = s dY B_stack, the gate's gradient from the saved ungated H.
        dh = torch.mm(dya, b_stack_t.t())
        dh.mul_(s)
        dh_e = dh[:, r_k:].view(T, num_experts, rank)
        dgate = (dh_e * h[:, r_k:].view(T, num_experts, rank)).sum(-1).to(probs.dtype)   # [T, E]
        if routed_mask is not None:
            dgate.mul_(routed_mask.to(dgate.dtype).unsqueeze(-1))  # a switched-off gate passes no gradient
        dh_e.mul_(gates.to(adt).unsqueeze(-1))                                            # dH = dH_g * gate

        # Router: gates = scatter(p_sel / sum p_sel), then the softmax backward.
        dw = dgate.gather(1, topk_idx)
        w = gates.gather(1, topk_idx)
        p_sel_sum = probs.gather(1, topk_idx).sum(-1, keepdim=True)
        dp_sel = (dw - (dw * w).sum(-1, keepdim=True)) / p_sel_sum
        dp = torch.zeros_like(probs).scatter_(1, topk_idx, dp_sel)
        dlogits = probs * (dp - (dp * probs).sum(-1, keepdim=True))
        dh_ext = torch.cat([dh, dlogits], dim=1) if fold else dh

        d_sa = d_ea = d_rw = None
        if n_sa or n_ea or (fold and n_rw):
            da = torch.mm(dh_ext.t(), xa)
            d_sa = da[:r_k] if n_sa else None
            d_ea = da[r_k:R].view(num_experts, rank, d_in) if n_ea else None
            d_rw = da[R:] if (fold and n_rw) else None
        if n_rw and not fold:
            d_rw = torch.mm(dlogits.t(), xa.to(dlogits.dtype)).to(router_weight.dtype)
        d_rb = dlogits.sum(0).to(router_weight.dtype) if n_rb else None

        def adapter_dx(out=None):
            # dH A_stack (+ dlogits W_r), accumulated into `out` when given.
            if out is None:
                out = torch.mm(dh_ext, a_ext)
            else:
                out.addmm_(dh_ext, a_ext)
            if not fold:
                out.addmm_(dlogits.to(adt), router_weight.to(adt))
            return out

        d_x = d_xa = None
        if ctx.separate_xa:
            d_xa = adapter_dx() if n_xa else None
            if n_x and weight is not None:
                d_x = torch.mm(dy, weight)
        elif n_x:
            if weight is not None and weight.dtype == adt and ctx.x_dtype == adt:
                # One buffer: dY W, then the adapter and router terms accumulated in place.
                d_x = adapter_dx(torch.mm(dy, weight))
            else:
                d_x = adapter_dx().to(ctx.x_dtype)
                if weight is not None:
                    d_x.add_(torch.mm(dy, weight))

        # The base weight is frozen in the adapters; stay correct if it is not.
        d_w = torch.mm(dy.t(), x).to(weight.dtype) if (n_w and weight is not None) else None
        d_b = dy.sum(0) if (n_b and ctx.has_bias) else None
        return (d_x, d_xa, d_w, d_b, d_rw, d_rb, d_sa, d_sb, d_ea, d_eb, None, None, None)


def mixture_lora_torch(x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                       expert_A, expert_B, top_k, scaling, adapter_x=None, routed_mask=None):
    """Plain-PyTorch shrink-gate-expand path (the CPU production path).

    x: [T, in] in the base dtype; weight: [out, in]; shared_A: [r_k, in];
    shared_B: [out, r_k]; expert_A: [E, r, in]; expert_B: [E, out, r].
    `weight=None` returns the adapter delta only (in the adapter dtype).
    `adapter_x` (default x) is the adapter-path input, which differs from x
    only under LoRA dropout. `routed_mask` ([T], 1 keep / 0 off) switches the
    Noise Aggregator off for some tokens: their routed gates are 0 (the
    experts and the router still get a gradient tensor, zero for those tokens,
    so every ZeRO-3 rank reduces the same parameters).
    """
    if not 1 <= top_k <= expert_A.shape[0]:
        raise ValueError(f"top_k must be in [1, {expert_A.shape[0]}], got {top_k}")
    return _MixtureLoRATorch.apply(x, adapter_x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                                   expert_A, expert_B, top_k, scaling, routed_mask)


def fused_mixture_lora(x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                       expert_A, expert_B, top_k, scaling, routed_mask=None):
    """The mixture-of-LoRA layer output for x [T, in]: Triton on CUDA, PyTorch elsewhere.

    A `routed_mask` (see mixture_lora_torch) takes the PyTorch path: the Triton kernels gate every token.
    """
    if routed_mask is None and use_triton(x, weight):
        from .mixture_lora_triton import mixture_lora_triton
        return mixture_lora_triton(x, weight, bias, router_weight, router_bias, shared_A,
                                   shared_B, expert_A, expert_B, top_k, scaling)
    return mixture_lora_torch(x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                              expert_A, expert_B, top_k, scaling, routed_mask=routed_mask)
