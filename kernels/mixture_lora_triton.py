"""Fused mixture-of-LoRA linear layer in Triton (shrink-gate-expand, DESIGN.md section 5).

Forward, two kernels:
  1. `_shrink_route_kernel`: H = X [A_k; A_1..A_E]^T for a block of tokens and
     a block of the stacked rank columns, with the router fused in: the
     logits X W_r^T + b_r accumulate in the same loop over d_in, then the
     float32 softmax, the top-k, the renormalisation and the per-column gate
     (1 for the shared columns, g_e for a selected expert's, 0 otherwise)
     are applied in registers. Writes H and H_g ([T, R] float32, R = r_k + E r),
     and probs/gates/top-k indices ([T, E], [T, k]).
  2. `_base_expand_kernel`: Y = X W^T (+ b) + s H_g [B_k, B_1..B_E]^T, the
     expand accumulated into the base GEMM's accumulator: one output pass, no
     [E, T, out] tensor and no separate base output to add to.
Backward, five kernels, from the saved H/H_g (nothing recomputed):
  3. `_grad_hg_kernel`: dH_g = s dY B_stack ([T, R] float32), then
     `_gate_router_grad_kernel`: the gate's gradient sum_j dH_g H over each
     expert's columns, dH = dH_g * gate, and the renormalised-top-k +
     softmax backward to dlogits: dH_ext = [dH, dlogits] ([T, R + E] float32).
  4. `_grad_x_kernel`: dX = dY W + dH_ext [A_stack; W_r] in one pass over W.
  5. `_grad_b_kernel`: dB_stack = s dY^T H_g, written into dB_k and dB_e.
  6. `_grad_a_kernel`: d[A_stack; W_r] = dH_ext^T X, written into dA_k, dA_e, dW_r.
The frozen weight and bias get no gradient (computed with PyTorch only if
they do require one).

Accumulation is float32 throughout; 16-bit operands use the tensor cores
natively, float32 operands use TF32x3 (about float32 accuracy) unless
torch.backends.cuda.matmul.allow_tf32 asks for plain TF32. Under Triton's
interpreter every dot is computed in float32 (its numpy bf16 dot is broken).
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests set this to fill every output and scratch buffer with NaN (-1 for
# integers) before the kernels run, so an element a kernel fails to write
# shows up in the results.
POISON = os.environ.get("MEDCARE_KERNELS_POISON", "0") == "1"

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _empty(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def _fp32_precision():
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _bucket(n):
    """Autotuning key for a token count: its power-of-two bucket."""
    return triton.next_power_of_2(max(int(n), 1))


def _configs(space, interp):
    if INTERPRET:
        return [triton.Config(interp, num_warps=4, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in space]


_SMEM_LIMIT = 220 * 1024          # H100/H200: 227 KB of shared memory per block


def _smem_prune(per_stage, *operands):
    """`early_config_prune` dropping configs whose pipelined tiles overflow shared memory.

    per_stage(meta, esize) -> bytes of one pipeline stage, esize the widest
    element size among the named operand tensors (4 for float32 inputs).
    """
    def prune(configs, named_args, **kwargs):
        esize = max(named_args[n].element_size() for n in operands)
        cost = [c.num_stages * per_stage(c.kwargs, esize) for c in configs]
        kept = [c for c, b in zip(configs, cost) if b <= _SMEM_LIMIT]
        return kept or [configs[cost.index(min(cost))]]
    return {"early_config_prune": prune}


# ---------------------------------------------------------------- jit helpers

@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _column_expert(js, RK, RANK, NE):
    """Index into the [BT, EP] gate table of each stacked rank column (NE: the shared columns' 1)."""
    return tl.where(js < RK, NE, (tl.maximum(js, RK) - RK) // RANK)


@triton.jit
def _gate_columns(gates1, js, RK, RANK, NE, BT: tl.constexpr, BR: tl.constexpr):
    """[BT, BR] gate of each stacked rank column, gathered from gates1 = [gates | 1 at column NE]."""
    col = tl.minimum(_column_expert(js, RK, RANK, NE), NE)
    return tl.gather(gates1, tl.zeros((BT, BR), dtype=tl.int32) + col[None, :], axis=1)


@triton.jit
def _swizzle(pid, n_m, n_n, GROUP: tl.constexpr):
    """Grouped program order: GROUP row blocks walk the column blocks together (L2 reuse of W)."""
    width = GROUP * n_n
    group = pid // width
    first_m = group * GROUP
    size_m = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


# ---------------------------------------------------------------- forward

@triton.autotune(
    configs=_configs([({"BT": bt, "BR": br, "BK": bk}, w, s)
                      for bt, br, bk, w, s in [(64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (64, 32, 128, 4, 3),
                                               (128, 32, 64, 4, 4), (32, 64, 128, 4, 4), (64, 128, 64, 8, 3),
                                               (64, 64, 32, 4, 4), (128, 64, 32, 8, 4)]],
                     {"BT": 32, "BR": 64, "BK": 64}),
    key=["T_BUCKET", "IN", "R", "NE"],
    prune_configs_by=_smem_prune(lambda m, e: (m["BT"] * m["BK"] + m["BK"] * m["BR"]) * e + m["BK"] * 64,
                                 "x_ptr", "a_ptr"))
@triton.jit
def _shrink_route_kernel(x_ptr, a_ptr, rw_ptr, rb_ptr, h_ptr, hg_ptr, probs_ptr, gates_ptr, idx_ptr,
                         T, IN, RK, R, NE, RANK,
                         s_xt, s_xk, s_rw_e, s_rw_k,
                         T_BUCKET,
                         HAS_RB: tl.constexpr, TOPK: tl.constexpr, EP: tl.constexpr,
                         ADT: tl.constexpr, RDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                         BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """H = X A_stack^T for a [BT, BR] block, with the router's logits, softmax, top-k and gate fused."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t.to(tl.int64)
    js = pid_r * BR + tl.arange(0, BR)
    jmask = js < R
    offs_e = tl.arange(0, EP)
    emask = offs_e < NE
    kk = tl.arange(0, BK)

    x_ptrs = x_ptr + rows_t[:, None] * s_xt + kk[None, :] * s_xk
    a_ptrs = a_ptr + js[None, :].to(tl.int64) * IN + kk[:, None]           # A_stack^T tile [BK, BR]
    w_ptrs = rw_ptr + offs_e[None, :] * s_rw_e + kk[:, None] * s_rw_k      # W_r^T tile [BK, EP]
    acc = tl.zeros((BT, BR), dtype=tl.float32)
    lacc = tl.zeros((BT, EP), dtype=tl.float32)
    for k0 in range(0, IN, BK):
        km = (k0 + kk) < IN
        x = tl.load(x_ptrs, mask=tmask[:, None] & km[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=km[:, None] & jmask[None, :], other=0.0)
        acc = _mma(x.to(ADT), a, acc, PREC, UPCAST)
        wr = tl.load(w_ptrs, mask=km[:, None] & emask[None, :], other=0.0)
        lacc = _mma(x.to(RDT), wr.to(RDT), lacc, PREC, UPCAST)
        x_ptrs += BK * s_xk
        a_ptrs += BK
        w_ptrs += BK * s_rw_k

    # Router: float32 softmax, top-k (the lowest index wins a tie), renormalise.
    logits = lacc
    if HAS_RB:
        logits += tl.load(rb_ptr + offs_e, mask=emask, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(emask[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    rem = tl.where(emask[None, :], p, -1.0)
    sel = tl.zeros((BT, EP), dtype=tl.int32)
    for i in tl.static_range(TOPK):
        mx = tl.max(rem, axis=1)
        idx = tl.min(tl.where(rem == mx[:, None], offs_e[None, :], EP), axis=1)
        hit = offs_e[None, :] == idx[:, None]
        sel = tl.where(hit, 1, sel)
        rem = tl.where(hit, -2.0, rem)
        if pid_r == 0:
            tl.store(idx_ptr + rows_t * TOPK + i, idx, mask=tmask)
    psel = tl.where(sel != 0, p, 0.0)
    gates = psel / tl.sum(psel, axis=1)[:, None]
    if pid_r == 0:
        emask2 = tmask[:, None] & emask[None, :]
        tl.store(probs_ptr + rows_t[:, None] * NE + offs_e[None, :], p, mask=emask2)
        tl.store(gates_ptr + rows_t[:, None] * NE + offs_e[None, :], gates, mask=emask2)

    gcol = _gate_columns(tl.where(offs_e[None, :] == NE, 1.0, gates), js, RK, RANK, NE, BT, BR)
    hmask = tmask[:, None] & jmask[None, :]
    tl.store(h_ptr + rows_t[:, None] * R + js[None, :], acc, mask=hmask)
    tl.store(hg_ptr + rows_t[:, None] * R + js[None, :], acc * gcol, mask=hmask)


@triton.autotune(
    configs=_configs([({"BT": bt, "BN": bn, "BK": bk, "BR": br, "GROUP": 8}, w, s)
                      for bt, bn, bk, br, w, s in [(128, 256, 64, 32, 8, 3), (128, 128, 64, 32, 8, 4),
                                                   (64, 256, 64, 32, 8, 4), (128, 64, 64, 32, 4, 4),
                                                   (64, 128, 64, 32, 4, 4), (64, 64, 64, 32, 4, 5),
                                                   (128, 128, 32, 32, 8, 4), (64, 64, 32, 32, 4, 4)]],
                     {"BT": 32, "BN": 64, "BK": 64, "BR": 64, "GROUP": 8}),
    key=["T_BUCKET", "IN", "OUT", "R"],
    prune_configs_by=_smem_prune(lambda m, e: (m["BT"] * m["BK"] + m["BK"] * m["BN"]) * e, "x_ptr", "w_ptr"))
@triton.jit
def _base_expand_kernel(x_ptr, w_ptr, b_ptr, hg_ptr, bt_ptr, y_ptr,
                        T, IN, OUT, R, scaling,
                        s_xt, s_xk, s_wn, s_wk, s_yt, s_yn,
                        T_BUCKET,
                        HAS_BIAS: tl.constexpr, XDT: tl.constexpr, LDT: tl.constexpr,
                        PREC: tl.constexpr, UPCAST: tl.constexpr,
                        BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                        GROUP: tl.constexpr):
    """Y = X W^T (+ b) + s H_g B_stack^T: the expand accumulates into the base GEMM's accumulator."""
    pid_t, pid_n = _swizzle(tl.program_id(0), tl.cdiv(T, BT), tl.cdiv(OUT, BN), GROUP)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t.to(tl.int64)
    ns = pid_n * BN + tl.arange(0, BN)
    nmask = ns < OUT
    kk = tl.arange(0, BK)

    x_ptrs = x_ptr + rows_t[:, None] * s_xt + kk[None, :] * s_xk
    w_ptrs = w_ptr + ns[None, :].to(tl.int64) * s_wn + kk[:, None] * s_wk          # W^T tile [BK, BN]
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for k0 in range(0, IN, BK):                                   # base GEMM
        km = (k0 + kk) < IN
        x = tl.load(x_ptrs, mask=tmask[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=nmask[None, :] & km[:, None], other=0.0)
        acc = _mma(x.to(XDT), w.to(XDT), acc, PREC, UPCAST)
        x_ptrs += BK * s_xk
        w_ptrs += BK * s_wk
    rr = tl.arange(0, BR)
    h_ptrs = hg_ptr + rows_t[:, None] * R + rr[None, :]
    b_ptrs = bt_ptr + rr[:, None].to(tl.int64) * OUT + ns[None, :]              # B_stack^T tile [BR, BN]
    for j0 in range(0, R, BR):                                    # expand, same accumulator
        jm = (j0 + rr) < R
        hg = tl.load(h_ptrs, mask=tmask[:, None] & jm[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=jm[:, None] & nmask[None, :], other=0.0)
        acc = _mma((hg * scaling).to(LDT), b, acc, PREC, UPCAST)
        h_ptrs += BR
        b_ptrs += BR * OUT
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_t[:, None] * s_yt + ns[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


# ---------------------------------------------------------------- backward

@triton.autotune(
    configs=_configs([({"BT": bt, "BR": br, "BN": bn}, w, s)
                      for bt, br, bn, w, s in [(64, 64, 128, 4, 4), (128, 64, 64, 8, 4), (32, 64, 128, 4, 4),
                                               (64, 32, 128, 4, 4), (128, 32, 128, 8, 3), (64, 128, 64, 8, 3),
                                               (128, 64, 32, 8, 4), (64, 64, 32, 4, 4)]],
                     {"BT": 32, "BR": 64, "BN": 64}),
    key=["T_BUCKET", "OUT", "R"],
    prune_configs_by=_smem_prune(lambda m, e: (m["BT"] * m["BN"] + m["BN"] * m["BR"]) * e, "dy_ptr", "bt_ptr"))
@triton.jit
def _grad_hg_kernel(dy_ptr, bt_ptr, dhg_ptr, T, OUT, R, scaling, s_dyt, s_dyn, T_BUCKET,
                    LDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    BT: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    """dH_g = s dY B_stack for a [BT, BR] block (a reduction over d_out)."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t.to(tl.int64)
    js = pid_r * BR + tl.arange(0, BR)
    jmask = js < R
    nn = tl.arange(0, BN)
    dy_ptrs = dy_ptr + rows_t[:, None] * s_dyt + nn[None, :] * s_dyn
    b_ptrs = bt_ptr + js[None, :].to(tl.int64) * OUT + nn[:, None]             # B_stack tile [BN, BR]
    acc = tl.zeros((BT, BR), dtype=tl.float32)
    for n0 in range(0, OUT, BN):
        nm = (n0 + nn) < OUT
        dy = tl.load(dy_ptrs, mask=tmask[:, None] & nm[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=nm[:, None] & jmask[None, :], other=0.0)
        acc = _mma(dy.to(LDT), b, acc, PREC, UPCAST)
        dy_ptrs += BN * s_dyn
        b_ptrs += BN
    tl.store(dhg_ptr + rows_t[:, None] * R + js[None, :], acc * scaling, mask=tmask[:, None] & jmask[None, :])


@triton.autotune(
    configs=_configs([({"BT": bt, "BR": br}, w, 1) for bt, br, w in [(16, 64, 4), (32, 64, 4), (64, 64, 8),
                                                                    (32, 128, 8), (64, 32, 4)]],
                     {"BT": 32, "BR": 64}),
    key=["T_BUCKET", "R", "NE"])
@triton.jit
def _gate_router_grad_kernel(dhg_ptr, h_ptr, probs_ptr, gates_ptr, idx_ptr, dh_ptr,
                             T, RK, R, NE, RANK, T_BUCKET,
                             TOPK: tl.constexpr, EP: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr):
    """dH_ext = [dH_g * gate, dlogits]: the gate's gradient, the renormalised top-k and softmax backward."""
    pid_t = tl.program_id(0)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t                     # T * (R + E) < 2**31
    offs_e = tl.arange(0, EP)
    emask2 = tmask[:, None] & (offs_e[None, :] < NE)
    gates = tl.load(gates_ptr + rows_t[:, None] * NE + offs_e[None, :], mask=emask2, other=0.0)
    probs = tl.load(probs_ptr + rows_t[:, None] * NE + offs_e[None, :], mask=emask2, other=0.0)
    gates1 = tl.where(offs_e[None, :] == NE, 1.0, gates)
    DH_W = R + NE
    rr = tl.arange(0, BR)

    # d gate_e = sum over expert e's columns of dH_g * H (a one-hot matmul, exact in fp32),
    # and dH = dH_g * gate column by column.
    dgate = tl.zeros((BT, EP), dtype=tl.float32)
    for j0 in range(0, R, BR):
        js = j0 + rr
        m2 = tmask[:, None] & (js < R)[None, :]
        dhg = tl.load(dhg_ptr + rows_t[:, None] * R + js[None, :], mask=m2, other=0.0)
        h = tl.load(h_ptr + rows_t[:, None] * R + js[None, :], mask=m2, other=0.0)
        onehot = (_column_expert(js, RK, RANK, NE)[:, None] == offs_e[None, :]).to(tl.float32)
        dgate = tl.dot(dhg * h, onehot, dgate, input_precision="ieee")
        gcol = _gate_columns(gates1, js, RK, RANK, NE, BT, BR)
        tl.store(dh_ptr + rows_t[:, None] * DH_W + js[None, :], dhg * gcol, mask=m2)

    # gates = p_sel / sum(p_sel) over the top-k; then the softmax backward.
    sel = tl.zeros((BT, EP), dtype=tl.int32)
    for i in tl.static_range(TOPK):
        idx = tl.load(idx_ptr + rows_t * TOPK + i, mask=tmask, other=-1)
        sel = tl.where(offs_e[None, :] == idx[:, None], 1, sel)
    psum = tl.sum(tl.where(sel != 0, probs, 0.0), axis=1)
    psum = tl.where(psum > 0, psum, 1.0)
    wdot = tl.sum(dgate * gates, axis=1)
    dp = tl.where(sel != 0, (dgate - wdot[:, None]) / psum[:, None], 0.0)
    dlog = probs * (dp - tl.sum(dp * probs, axis=1)[:, None])
    tl.store(dh_ptr + rows_t[:, None] * DH_W + R + offs_e[None, :], dlog, mask=emask2)


@triton.autotune(
    configs=_configs([({"BT": bt, "BK": bk, "BN": bn, "BJ": bj, "GROUP": 8}, w, s)
                      for bt, bk, bn, bj, w, s in [(128, 256, 64, 32, 8, 3), (128, 128, 64, 32, 8, 4),
                                                   (64, 256, 64, 32, 8, 4), (128, 64, 64, 32, 4, 4),
                                                   (64, 128, 64, 32, 4, 4), (64, 64, 64, 32, 4, 5),
                                                   (128, 128, 32, 32, 8, 4), (64, 64, 32, 32, 4, 4)]],
                     {"BT": 32, "BK": 64, "BN": 64, "BJ": 64, "GROUP": 8}),
    key=["T_BUCKET", "IN", "OUT", "DH_W"],
    prune_configs_by=_smem_prune(lambda m, e: (m["BT"] * m["BN"] + m["BN"] * m["BK"]) * e, "dy_ptr", "w_ptr"))
@triton.jit
def _grad_x_kernel(dy_ptr, w_ptr, dh_ptr, a_ptr, dx_ptr,
                   T, IN, OUT, DH_W,
                   s_dyt, s_dyn, s_wn, s_wk, s_dxt, s_dxk,
                   T_BUCKET,
                   XDT: tl.constexpr, LDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr,
                   GROUP: tl.constexpr):
    """dX = dY W + [dH, dlogits] [A_stack; W_r]: one pass over W, the adapter terms in the same accumulator."""
    pid_t, pid_k = _swizzle(tl.program_id(0), tl.cdiv(T, BT), tl.cdiv(IN, BK), GROUP)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t.to(tl.int64)
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < IN
    nn = tl.arange(0, BN)

    dy_ptrs = dy_ptr + rows_t[:, None] * s_dyt + nn[None, :] * s_dyn
    w_ptrs = w_ptr + nn[:, None].to(tl.int64) * s_wn + ks[None, :] * s_wk          # W tile [BN, BK]
    acc = tl.zeros((BT, BK), dtype=tl.float32)
    for n0 in range(0, OUT, BN):
        nm = (n0 + nn) < OUT
        dy = tl.load(dy_ptrs, mask=tmask[:, None] & nm[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=nm[:, None] & kmask[None, :], other=0.0)
        acc = _mma(dy.to(XDT), w.to(XDT), acc, PREC, UPCAST)
        dy_ptrs += BN * s_dyn
        w_ptrs += BN * s_wn
    jj = tl.arange(0, BJ)
    dh_ptrs = dh_ptr + rows_t[:, None] * DH_W + jj[None, :]
    a_ptrs = a_ptr + jj[:, None].to(tl.int64) * IN + ks[None, :]                  # A_ext tile [BJ, BK]
    for j0 in range(0, DH_W, BJ):
        jm = (j0 + jj) < DH_W
        dh = tl.load(dh_ptrs, mask=tmask[:, None] & jm[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=jm[:, None] & kmask[None, :], other=0.0)
        acc = _mma(dh.to(LDT), a, acc, PREC, UPCAST)
        dh_ptrs += BJ
        a_ptrs += BJ * IN
    tl.store(dx_ptr + rows_t[:, None] * s_dxt + ks[None, :] * s_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=tmask[:, None] & kmask[None, :])


@triton.autotune(
    configs=_configs([({"BN": bn, "BR": br, "BT": bt}, w, s)
                      for bn, br, bt, w, s in [(128, 32, 64, 4, 4), (256, 32, 64, 8, 3), (64, 32, 128, 4, 4),
                                               (128, 64, 128, 8, 3), (128, 64, 32, 8, 4), (64, 32, 32, 4, 4)]],
                     {"BN": 64, "BR": 64, "BT": 32}),
    key=["T_BUCKET", "OUT", "R"],
    prune_configs_by=_smem_prune(lambda m, e: m["BN"] * m["BT"] * e + m["BT"] * m["BR"] * 4, "dy_ptr", "dsb_ptr"))
@triton.jit
def _grad_b_kernel(dy_ptr, hg_ptr, dsb_ptr, deb_ptr,
                   T, OUT, RK, R, RANK, scaling,
                   s_dyt, s_dyn, s_dsb_n, s_dsb_j, s_deb_e, s_deb_n, s_deb_i,
                   T_BUCKET,
                   LDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BN: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr):
    """dB_stack = s dY^T H_g, stored straight into dB_k [out, r_k] and dB_e [E, out, r]."""
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    ns = pid_n * BN + tl.arange(0, BN)
    nmask = ns < OUT
    js = pid_j * BR + tl.arange(0, BR)
    jmask = js < R
    tt = tl.arange(0, BT)

    dy_ptrs = dy_ptr + tt[None, :].to(tl.int64) * s_dyt + ns[:, None] * s_dyn    # dY^T tile [BN, BT]
    h_ptrs = hg_ptr + tt[:, None].to(tl.int64) * R + js[None, :]
    acc = tl.zeros((BN, BR), dtype=tl.float32)
    for t0 in range(0, T, BT):
        tm = (t0 + tt) < T
        dyt = tl.load(dy_ptrs, mask=tm[None, :] & nmask[:, None], other=0.0)
        hg = tl.load(h_ptrs, mask=tm[:, None] & jmask[None, :], other=0.0)
        acc = _mma(dyt.to(LDT), hg.to(LDT), acc, PREC, UPCAST)
        dy_ptrs += BT * s_dyt
        h_ptrs += BT * R
    acc = acc * scaling
    is_s = js < RK
    is_e = (js >= RK) & jmask
    er = tl.where(is_e, js - RK, 0)
    e = er // RANK
    i = er - e * RANK
    jsc = tl.where(is_s, js, 0)
    tl.store(dsb_ptr + ns[:, None] * s_dsb_n + jsc[None, :] * s_dsb_j, acc.to(dsb_ptr.dtype.element_ty),
             mask=nmask[:, None] & is_s[None, :])
    tl.store(deb_ptr + e[None, :] * s_deb_e + ns[:, None] * s_deb_n + i[None, :] * s_deb_i,
             acc.to(deb_ptr.dtype.element_ty), mask=nmask[:, None] & is_e[None, :])


@triton.autotune(
    configs=_configs([({"BJ": bj, "BK": bk, "BT": bt}, w, s)
                      for bj, bk, bt, w, s in [(64, 128, 64, 4, 4), (32, 128, 64, 4, 4), (32, 256, 64, 8, 3),
                                               (64, 256, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 32, 8, 4)]],
                     {"BJ": 64, "BK": 64, "BT": 32}),
    key=["T_BUCKET", "IN", "R", "NE"],
    prune_configs_by=_smem_prune(lambda m, e: m["BJ"] * m["BT"] * 4 + m["BT"] * m["BK"] * e, "x_ptr", "dsa_ptr"))
@triton.jit
def _grad_a_kernel(dh_ptr, x_ptr, dsa_ptr, dea_ptr, drw_ptr,
                   T, IN, RK, R, NE, RANK,
                   s_xt, s_xk, s_dsa_r, s_dsa_k, s_dea_e, s_dea_r, s_dea_k, s_drw_r, s_drw_k,
                   T_BUCKET,
                   LDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BJ: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    """d[A_stack; W_r] = [dH, dlogits]^T X, stored straight into dA_k, dA_e and dW_r."""
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    js = pid_j * BJ + tl.arange(0, BJ)
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < IN
    DH_W = R + NE
    tt = tl.arange(0, BT)

    dh_ptrs = dh_ptr + tt[None, :].to(tl.int64) * DH_W + js[:, None]              # dH_ext^T tile [BJ, BT]
    x_ptrs = x_ptr + tt[:, None].to(tl.int64) * s_xt + ks[None, :] * s_xk
    acc = tl.zeros((BJ, BK), dtype=tl.float32)
    for t0 in range(0, T, BT):
        tm = (t0 + tt) < T
        dht = tl.load(dh_ptrs, mask=tm[None, :] & (js[:, None] < DH_W), other=0.0)
        x = tl.load(x_ptrs, mask=tm[:, None] & kmask[None, :], other=0.0)
        acc = _mma(dht.to(LDT), x.to(LDT), acc, PREC, UPCAST)
        dh_ptrs += BT * DH_W
        x_ptrs += BT * s_xt
    is_s = js < RK
    is_e = (js >= RK) & (js < R)
    is_r = (js >= R) & (js < DH_W)
    er = tl.where(is_e, js - RK, 0)
    e = er // RANK
    i = er - e * RANK
    rs = tl.where(is_s, js, 0)
    rr = tl.where(is_r, js - R, 0)
    km = kmask[None, :]
    tl.store(dsa_ptr + rs[:, None] * s_dsa_r + ks[None, :] * s_dsa_k, acc.to(dsa_ptr.dtype.element_ty),
             mask=is_s[:, None] & km)
    tl.store(dea_ptr + e[:, None] * s_dea_e + i[:, None] * s_dea_r + ks[None, :] * s_dea_k,
             acc.to(dea_ptr.dtype.element_ty), mask=is_e[:, None] & km)
    tl.store(drw_ptr + rr[:, None] * s_drw_r + ks[None, :] * s_drw_k, acc.to(drw_ptr.dtype.element_ty),
             mask=is_r[:, None] & km)


# ---------------------------------------------------------------- launchers

def _tl(dtype):
    if dtype not in _TL_DTYPES:
        raise TypeError(f"the Triton mixture-of-LoRA kernels support fp32/bf16/fp16, got {dtype}")
    return _TL_DTYPES[dtype]


def _router_dtype(x_dtype, rw_dtype):
    return _tl(torch.promote_types(x_dtype, rw_dtype))


class _Meta:
    """Shapes and compile-time choices shared by the forward and the backward."""

    def __init__(self, x, weight, router_weight, shared_A, expert_A, top_k):
        self.T, self.IN = x.shape
        self.OUT = weight.shape[0]
        self.NE, self.RANK, _ = expert_A.shape
        self.RK = shared_A.shape[0]
        self.R = self.RK + self.NE * self.RANK
        self.TOPK = int(top_k)
        self.EP = max(16, triton.next_power_of_2(self.NE + 1))   # + the shared columns' constant gate
        self.T_BUCKET = _bucket(self.T)
        self.XDT = _tl(x.dtype)
        self.ADT = _tl(expert_A.dtype)
        self.RDT = _router_dtype(x.dtype, router_weight.dtype)
        self.PREC = _fp32_precision()
        self.UPCAST = INTERPRET


def _stack_params(m, router_weight, shared_A, shared_B, expert_A, expert_B):
    """A_ext = [A_k; A_1..A_E; W_r] [R + E, in] and B_stack^T [R, out], contiguous, adapter dtype.

    A few MB at most (rank-sized); stacking them once per call keeps every
    hot loop a plain strided GEMM tile load.
    """
    adt = expert_A.dtype
    a_ext = torch.empty(m.R + m.NE, m.IN, dtype=adt, device=expert_A.device)
    a_ext[:m.RK].copy_(shared_A)
    a_ext[m.RK:m.R].view(m.NE, m.RANK, m.IN).copy_(expert_A)
    a_ext[m.R:].copy_(router_weight)
    b_t = torch.empty(m.R, m.OUT, dtype=adt, device=expert_B.device)
    b_t[:m.RK].copy_(shared_B.t())
    b_t[m.RK:].view(m.NE, m.RANK, m.OUT).copy_(expert_B.transpose(1, 2))
    return a_ext, b_t


def _forward(m, x, weight, bias, rw, rb, a_ext, b_t, scaling):
    dev = x.device
    h = _empty((m.T, m.R), torch.float32, dev)
    hg = _empty((m.T, m.R), torch.float32, dev)
    probs = _empty((m.T, m.NE), torch.float32, dev)
    gates = _empty((m.T, m.NE), torch.float32, dev)
    idx = _empty((m.T, m.TOPK), torch.int32, dev)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]), triton.cdiv(m.R, meta["BR"]))
    _shrink_route_kernel[grid](
        x, a_ext, rw, rb if rb is not None else rw, h, hg, probs, gates, idx,
        m.T, m.IN, m.RK, m.R, m.NE, m.RANK,
        x.stride(0), x.stride(1), rw.stride(0), rw.stride(1), m.T_BUCKET,
        HAS_RB=rb is not None, TOPK=m.TOPK, EP=m.EP, ADT=m.ADT, RDT=m.RDT, PREC=m.PREC, UPCAST=m.UPCAST)

    y = _empty((m.T, m.OUT), x.dtype, dev)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]) * triton.cdiv(m.OUT, meta["BN"]),)
    _base_expand_kernel[grid](
        x, weight, bias if bias is not None else weight, hg, b_t, y,
        m.T, m.IN, m.OUT, m.R, float(scaling),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1), m.T_BUCKET,
        HAS_BIAS=bias is not None, XDT=m.XDT, LDT=m.ADT, PREC=m.PREC, UPCAST=m.UPCAST)
    return y, h, hg, probs, gates, idx


def _grad_h(m, dy, b_t, h, probs, gates, idx, scaling):
    dhg = _empty((m.T, m.R), torch.float32, dy.device)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]), triton.cdiv(m.R, meta["BR"]))
    _grad_hg_kernel[grid](
        dy, b_t, dhg, m.T, m.OUT, m.R, float(scaling), dy.stride(0), dy.stride(1), m.T_BUCKET,
        LDT=m.ADT, PREC=m.PREC, UPCAST=m.UPCAST)
    dh = _empty((m.T, m.R + m.NE), torch.float32, dy.device)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]),)
    _gate_router_grad_kernel[grid](
        dhg, h, probs, gates, idx, dh, m.T, m.RK, m.R, m.NE, m.RANK, m.T_BUCKET, TOPK=m.TOPK, EP=m.EP)
    return dh


def _grad_x(m, dy, weight, dh, a_ext, x_dtype):
    dx = _empty((m.T, m.IN), x_dtype, dy.device)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]) * triton.cdiv(m.IN, meta["BK"]),)
    _grad_x_kernel[grid](
        dy, weight, dh, a_ext, dx,
        m.T, m.IN, m.OUT, m.R + m.NE,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
        m.T_BUCKET, XDT=m.XDT, LDT=m.ADT, PREC=m.PREC, UPCAST=m.UPCAST)
    return dx


def _grad_b(m, dy, hg, sb, eb, scaling):
    dsb = _empty(sb.shape, sb.dtype, dy.device)
    deb = _empty(eb.shape, eb.dtype, dy.device)
    grid = lambda meta: (triton.cdiv(m.OUT, meta["BN"]), triton.cdiv(m.R, meta["BR"]))
    _grad_b_kernel[grid](
        dy, hg, dsb, deb, m.T, m.OUT, m.RK, m.R, m.RANK, float(scaling),
        dy.stride(0), dy.stride(1), dsb.stride(0), dsb.stride(1), deb.stride(0), deb.stride(1), deb.stride(2),
        m.T_BUCKET, LDT=m.ADT, PREC=m.PREC, UPCAST=m.UPCAST)
    return dsb, deb


def _grad_a(m, dh, x, sa, ea, rw):
    dsa = _empty(sa.shape, sa.dtype, x.device)
    dea = _empty(ea.shape, ea.dtype, x.device)
    drw = _empty(rw.shape, rw.dtype, x.device)
    grid = lambda meta: (triton.cdiv(m.R + m.NE, meta["BJ"]), triton.cdiv(m.IN, meta["BK"]))
    _grad_a_kernel[grid](
        dh, x, dsa, dea, drw, m.T, m.IN, m.RK, m.R, m.NE, m.RANK,
        x.stride(0), x.stride(1), dsa.stride(0), dsa.stride(1), dea.stride(0), dea.stride(1), dea.stride(2),
        drw.stride(0), drw.stride(1), m.T_BUCKET, LDT=m.ADT, PREC=m.PREC, UPCAST=m.UPCAST)
    return dsa, dea, drw


class _MixtureLoRATriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, router_weight, router_bias, shared_A, shared_B, expert_A, expert_B,
                top_k, scaling):
        m = _Meta(x, weight, router_weight, shared_A, expert_A, top_k)
        a_ext, b_t = _stack_params(m, router_weight, shared_A, shared_B, expert_A, expert_B)
        y, h, hg, probs, gates, idx = _forward(m, x, weight, bias, router_weight, router_bias, a_ext, b_t,
                                               scaling)
        ctx.meta, ctx.scaling = m, scaling
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.has_rb = router_bias is not None
        ctx.save_for_backward(x, weight, router_weight, shared_A, shared_B, expert_A, expert_B, a_ext, b_t,
                              h, hg, probs, gates, idx)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rw, sa, sb, ea, eb, a_ext, b_t, h, hg, probs, gates, idx = ctx.saved_tensors
        m, s = ctx.meta, ctx.scaling
        n_x, n_w, n_b, n_rw, n_rb, n_sa, n_sb, n_ea, n_eb = ctx.needs_input_grad[:9]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        d_x = d_w = d_b = d_rw = d_rb = d_sa = d_sb = d_ea = d_eb = None
        need_dh = n_x or n_rw or n_rb or n_sa or n_ea
        dh = _grad_h(m, dy, b_t, h, probs, gates, idx, s) if need_dh else None
        if n_x:
            d_x = _grad_x(m, dy, weight, dh, a_ext, x.dtype)
        if n_sb or n_eb:
            d_sb, d_eb = _grad_b(m, dy, hg, sb, eb, s)
        if n_sa or n_ea or n_rw:
            d_sa, d_ea, d_rw = _grad_a(m, dh, x, sa, ea, rw)
        if n_rb and ctx.has_rb:
            d_rb = dh[:, m.R:].sum(0).to(rw.dtype)
        # The base weight is frozen in the adapters; stay correct if it is not.
        if n_w:
            d_w = torch.mm(dy.t().to(weight.dtype), x.to(weight.dtype))
        if n_b and ctx.bias_dtype is not None:
            d_b = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return (d_x, d_w, d_b, d_rw if n_rw else None, d_rb, d_sa if n_sa else None, d_sb if n_sb else None,
                d_ea if n_ea else None, d_eb if n_eb else None, None, None)


def mixture_lora_triton(x, weight, bias, router_weight, router_bias, shared_A, shared_B, expert_A, expert_B,
                        top_k, scaling):
    """Fused mixture-of-LoRA layer output for x [T, in] (Triton; CUDA, or CPU under TRITON_INTERPRET=1).

    Same contract as `kernels.mixture_lora.mixture_lora_torch` with a base
    weight. float64 inputs fall back to the PyTorch path (no fp64 kernels).
    """
    if not 1 <= top_k <= expert_A.shape[0]:
        raise ValueError(f"top_k must be in [1, {expert_A.shape[0]}], got {top_k}")
    if torch.float64 in (x.dtype, expert_A.dtype, weight.dtype):
        from .mixture_lora import mixture_lora_torch
        return mixture_lora_torch(x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                                  expert_A, expert_B, top_k, scaling)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, in], got shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if x.shape[0] == 0:
        return torch.zeros(0, weight.shape[0], dtype=x.dtype, device=x.device, requires_grad=x.requires_grad)
    return _MixtureLoRATriton.apply(x, weight, bias, router_weight, router_bias, shared_A, shared_B,
                                    expert_A, expert_B, top_k, scaling)
