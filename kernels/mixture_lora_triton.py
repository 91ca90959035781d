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
Backward, four kernels, from the saved H/H_g (nothing recomputed):
  3. `_grad_h_kernel`: dH_g = s dY B_stack per token block, the gate's gradient
     sum_j dH_g H over each expert's columns, dH = dH_g * gate, and the
     renormalised-top-k + softmax backward to dlogits: writes
     dH_ext = [dH, dlogits] ([T, R + E] float32).
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


# ---------------------------------------------------------------- jit helpers

@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_a_rows(sa_ptr, ea_ptr, rw_ptr, rows, ks, RK, R, NE, RANK, IN,
                 s_sa_r, s_sa_k, s_ea_e, s_ea_r, s_ea_k, s_rw_r, s_rw_k,
                 DT: tl.constexpr, WITH_ROUTER: tl.constexpr):
    """Tile [rows, ks] of A_ext = [A_k; A_1..A_E (; W_r)] in dtype DT."""
    kmask = ks[None, :] < IN
    is_s = rows < RK
    is_e = (rows >= RK) & (rows < R)
    er = tl.where(is_e, rows - RK, 0)
    e = er // RANK
    i = er - e * RANK
    rs = tl.where(is_s, rows, 0)
    t = tl.load(sa_ptr + rs[:, None] * s_sa_r + ks[None, :] * s_sa_k,
                mask=is_s[:, None] & kmask, other=0.0).to(DT)
    t += tl.load(ea_ptr + e[:, None] * s_ea_e + i[:, None] * s_ea_r + ks[None, :] * s_ea_k,
                 mask=is_e[:, None] & kmask, other=0.0).to(DT)
    if WITH_ROUTER:
        is_r = (rows >= R) & (rows < R + NE)
        rr = tl.where(is_r, rows - R, 0)
        t += tl.load(rw_ptr + rr[:, None] * s_rw_r + ks[None, :] * s_rw_k,
                     mask=is_r[:, None] & kmask, other=0.0).to(DT)
    return t


@triton.jit
def _load_b_cols(sb_ptr, eb_ptr, ns, js, OUT, RK, R, RANK, s_sb_n, s_sb_j, s_eb_e, s_eb_n, s_eb_i,
                 DT: tl.constexpr):
    """Tile [ns, js] of B_stack = [B_k, B_1..B_E] ([out, R]) in dtype DT."""
    nmask = ns[:, None] < OUT
    is_s = js < RK
    is_e = (js >= RK) & (js < R)
    er = tl.where(is_e, js - RK, 0)
    e = er // RANK
    i = er - e * RANK
    jsc = tl.where(is_s, js, 0)
    t = tl.load(sb_ptr + ns[:, None] * s_sb_n + jsc[None, :] * s_sb_j,
                mask=nmask & is_s[None, :], other=0.0).to(DT)
    t += tl.load(eb_ptr + e[None, :] * s_eb_e + ns[:, None] * s_eb_n + i[None, :] * s_eb_i,
                 mask=nmask & is_e[None, :], other=0.0).to(DT)
    return t


@triton.jit
def _gate_columns(gates, offs_e, js, RK, RANK, BT: tl.constexpr, BR: tl.constexpr, EP: tl.constexpr):
    """[BT, BR] gate of each stacked rank column: 1 (shared), g_e (expert e's columns)."""
    col_e = tl.where(js >= RK, (js - RK) // RANK, -1)
    gcol = tl.zeros((BT, BR), dtype=tl.float32) + tl.where(js < RK, 1.0, 0.0)[None, :]
    for e in tl.static_range(EP):
        ge = tl.sum(tl.where(offs_e[None, :] == e, gates, 0.0), axis=1)
        gcol += tl.where((col_e == e)[None, :], ge[:, None], 0.0)
    return gcol


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
                                               (128, 32, 64, 4, 4), (32, 64, 128, 4, 4)]],
                     {"BT": 32, "BR": 64, "BK": 64}),
    key=["T_BUCKET", "IN", "R", "NE"])
@triton.jit
def _shrink_route_kernel(x_ptr, sa_ptr, ea_ptr, rw_ptr, rb_ptr, h_ptr, hg_ptr, probs_ptr, gates_ptr, idx_ptr,
                         T, IN, RK, R, NE, RANK,
                         s_xt, s_xk, s_sa_r, s_sa_k, s_ea_e, s_ea_r, s_ea_k, s_rw_r, s_rw_k,
                         T_BUCKET,
                         HAS_RB: tl.constexpr, TOPK: tl.constexpr, EP: tl.constexpr,
                         ADT: tl.constexpr, RDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                         BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t.to(tl.int64)
    js = pid_r * BR + tl.arange(0, BR)
    offs_e = tl.arange(0, EP)
    emask = offs_e < NE

    acc = tl.zeros((BT, BR), dtype=tl.float32)
    lacc = tl.zeros((BT, EP), dtype=tl.float32)
    for k0 in range(0, IN, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows_t[:, None] * s_xt + ks[None, :] * s_xk,
                    mask=tmask[:, None] & (ks[None, :] < IN), other=0.0)
        a = _load_a_rows(sa_ptr, ea_ptr, rw_ptr, js, ks, RK, R, NE, RANK, IN,
                         s_sa_r, s_sa_k, s_ea_e, s_ea_r, s_ea_k, s_rw_r, s_rw_k, ADT, False)
        acc = _mma(x.to(ADT), tl.trans(a), acc, PREC, UPCAST)
        wr = tl.load(rw_ptr + offs_e[:, None] * s_rw_r + ks[None, :] * s_rw_k,
                     mask=emask[:, None] & (ks[None, :] < IN), other=0.0)
        lacc = _mma(x.to(RDT), tl.trans(wr.to(RDT)), lacc, PREC, UPCAST)

    # Router: float32 softmax, top-k (lowest index wins a tie), renormalise.
    logits = lacc
    if HAS_RB:
        logits += tl.load(rb_ptr + offs_e, mask=emask, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(emask[None, :], logits, float("-inf"))
    m = tl.max(logits, axis=1)
    p = tl.exp(logits - m[:, None])
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

    gcol = _gate_columns(gates, offs_e, js, RK, RANK, BT, BR, EP)
    hmask = tmask[:, None] & (js[None, :] < R)
    tl.store(h_ptr + rows_t[:, None] * R + js[None, :], acc, mask=hmask)
    tl.store(hg_ptr + rows_t[:, None] * R + js[None, :], acc * gcol, mask=hmask)


@triton.autotune(
    configs=_configs([({"BT": bt, "BN": bn, "BK": bk, "BR": br, "GROUP": 8}, w, s)
                      for bt, bn, bk, br, w, s in [(128, 256, 64, 32, 8, 3), (128, 128, 64, 32, 8, 4),
                                                   (128, 128, 64, 64, 4, 4), (64, 256, 64, 32, 8, 4),
                                                   (128, 64, 64, 32, 4, 4), (64, 128, 64, 32, 4, 4),
                                                   (64, 64, 64, 32, 4, 5)]],
                     {"BT": 32, "BN": 64, "BK": 64, "BR": 64, "GROUP": 8}),
    key=["T_BUCKET", "IN", "OUT", "R"])
@triton.jit
def _base_expand_kernel(x_ptr, w_ptr, b_ptr, hg_ptr, sb_ptr, eb_ptr, y_ptr,
                        T, IN, OUT, RK, R, RANK, scaling,
                        s_xt, s_xk, s_wn, s_wk, s_sb_n, s_sb_j, s_eb_e, s_eb_n, s_eb_i, s_yt, s_yn,
                        T_BUCKET,
                        HAS_BIAS: tl.constexpr, XDT: tl.constexpr, LDT: tl.constexpr,
                        PREC: tl.constexpr, UPCAST: tl.constexpr,
                        BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                        GROUP: tl.constexpr):
    pid_t, pid_n = _swizzle(tl.program_id(0), tl.cdiv(T, BT), tl.cdiv(OUT, BN), GROUP)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t.to(tl.int64)
    ns = pid_n * BN + tl.arange(0, BN)
    nmask = ns < OUT

    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for k0 in range(0, IN, BK):                                   # base GEMM
        ks = k0 + tl.arange(0, BK)
        kmask = ks < IN
        x = tl.load(x_ptr + rows_t[:, None] * s_xt + ks[None, :] * s_xk,
                    mask=tmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + ns[None, :] * s_wn + ks[:, None] * s_wk,
                    mask=nmask[None, :] & kmask[:, None], other=0.0)
        acc = _mma(x.to(XDT), w.to(XDT), acc, PREC, UPCAST)
    for j0 in range(0, R, BR):                                    # expand, same accumulator
        js = j0 + tl.arange(0, BR)
        hg = tl.load(hg_ptr + rows_t[:, None] * R + js[None, :],
                     mask=tmask[:, None] & (js[None, :] < R), other=0.0)
        bt = tl.trans(_load_b_cols(sb_ptr, eb_ptr, ns, js, OUT, RK, R, RANK,
                                   s_sb_n, s_sb_j, s_eb_e, s_eb_n, s_eb_i, LDT))
        acc = _mma((hg * scaling).to(LDT), bt, acc, PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_t[:, None] * s_yt + ns[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


# ---------------------------------------------------------------- backward

@triton.autotune(
    configs=_configs([({"BT": bt, "BR": br, "BN": bn}, w, s)
                      for bt, br, bn, w, s in [(64, 64, 128, 4, 4), (128, 64, 64, 8, 4), (32, 64, 128, 4, 4),
                                               (64, 32, 128, 4, 4), (128, 32, 128, 8, 3)]],
                     {"BT": 32, "BR": 64, "BN": 64}),
    key=["T_BUCKET", "OUT", "R", "NE"])
@triton.jit
def _grad_h_kernel(dy_ptr, sb_ptr, eb_ptr, h_ptr, probs_ptr, gates_ptr, idx_ptr, dh_ptr,
                   T, OUT, RK, R, NE, RANK, scaling,
                   s_dyt, s_dyn, s_sb_n, s_sb_j, s_eb_e, s_eb_n, s_eb_i,
                   T_BUCKET,
                   TOPK: tl.constexpr, EP: tl.constexpr, LDT: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BT: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    pid_t = tl.program_id(0)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t.to(tl.int64)
    offs_e = tl.arange(0, EP)
    emask2 = tmask[:, None] & (offs_e[None, :] < NE)
    gates = tl.load(gates_ptr + rows_t[:, None] * NE + offs_e[None, :], mask=emask2, other=0.0)
    probs = tl.load(probs_ptr + rows_t[:, None] * NE + offs_e[None, :], mask=emask2, other=0.0)
    DH_W = R + NE

    dgate = tl.zeros((BT, EP), dtype=tl.float32)
    for j0 in range(0, R, BR):
        js = j0 + tl.arange(0, BR)
        jmask = js < R
        acc = tl.zeros((BT, BR), dtype=tl.float32)
        for n0 in range(0, OUT, BN):
            ns = n0 + tl.arange(0, BN)
            dy = tl.load(dy_ptr + rows_t[:, None] * s_dyt + ns[None, :] * s_dyn,
                         mask=tmask[:, None] & (ns[None, :] < OUT), other=0.0)
            b = _load_b_cols(sb_ptr, eb_ptr, ns, js, OUT, RK, R, RANK, s_sb_n, s_sb_j, s_eb_e, s_eb_n, s_eb_i, LDT)
            acc = _mma(dy.to(LDT), b, acc, PREC, UPCAST)
        dhg = acc * scaling
        h = tl.load(h_ptr + rows_t[:, None] * R + js[None, :], mask=tmask[:, None] & jmask[None, :], other=0.0)
        prod = dhg * h
        col_e = tl.where(js >= RK, (js - RK) // RANK, -1)
        for e in tl.static_range(EP):
            pe = tl.sum(tl.where((col_e == e)[None, :], prod, 0.0), axis=1)
            dgate += tl.where(offs_e[None, :] == e, pe[:, None], 0.0)
        gcol = _gate_columns(gates, offs_e, js, RK, RANK, BT, BR, EP)
        tl.store(dh_ptr + rows_t[:, None] * DH_W + js[None, :], dhg * gcol, mask=tmask[:, None] & jmask[None, :])

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
                                                   (128, 128, 64, 64, 4, 4), (64, 256, 64, 32, 8, 4),
                                                   (128, 64, 64, 32, 4, 4), (64, 128, 64, 32, 4, 4),
                                                   (64, 64, 64, 32, 4, 5)]],
                     {"BT": 32, "BK": 64, "BN": 64, "BJ": 64, "GROUP": 8}),
    key=["T_BUCKET", "IN", "OUT", "R"])
@triton.jit
def _grad_x_kernel(dy_ptr, w_ptr, dh_ptr, sa_ptr, ea_ptr, rw_ptr, dx_ptr,
                   T, IN, OUT, RK, R, NE, RANK,
                   s_dyt, s_dyn, s_wn, s_wk, s_sa_r, s_sa_k, s_ea_e, s_ea_r, s_ea_k, s_rw_r, s_rw_k,
                   s_dxt, s_dxk,
                   T_BUCKET,
                   XDT: tl.constexpr, LDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr,
                   GROUP: tl.constexpr):
    pid_t, pid_k = _swizzle(tl.program_id(0), tl.cdiv(T, BT), tl.cdiv(IN, BK), GROUP)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    rows_t = offs_t.to(tl.int64)
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < IN
    DH_W = R + NE

    acc = tl.zeros((BT, BK), dtype=tl.float32)
    for n0 in range(0, OUT, BN):                                  # dY W: one pass over W
        ns = n0 + tl.arange(0, BN)
        dy = tl.load(dy_ptr + rows_t[:, None] * s_dyt + ns[None, :] * s_dyn,
                     mask=tmask[:, None] & (ns[None, :] < OUT), other=0.0)
        w = tl.load(w_ptr + ns[:, None] * s_wn + ks[None, :] * s_wk,
                    mask=(ns[:, None] < OUT) & kmask[None, :], other=0.0)
        acc = _mma(dy.to(XDT), w.to(XDT), acc, PREC, UPCAST)
    for j0 in range(0, DH_W, BJ):                                 # + [dH, dlogits] [A_stack; W_r]
        js = j0 + tl.arange(0, BJ)
        dh = tl.load(dh_ptr + rows_t[:, None] * DH_W + js[None, :],
                     mask=tmask[:, None] & (js[None, :] < DH_W), other=0.0)
        a = _load_a_rows(sa_ptr, ea_ptr, rw_ptr, js, ks, RK, R, NE, RANK, IN,
                         s_sa_r, s_sa_k, s_ea_e, s_ea_r, s_ea_k, s_rw_r, s_rw_k, LDT, True)
        acc = _mma(dh.to(LDT), a, acc, PREC, UPCAST)
    tl.store(dx_ptr + rows_t[:, None] * s_dxt + ks[None, :] * s_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=tmask[:, None] & kmask[None, :])


@triton.autotune(
    configs=_configs([({"BN": bn, "BR": br, "BT": bt}, w, s)
                      for bn, br, bt, w, s in [(128, 64, 64, 4, 4), (128, 32, 64, 4, 4), (64, 64, 128, 4, 4),
                                               (256, 32, 64, 8, 3), (64, 32, 128, 4, 4)]],
                     {"BN": 64, "BR": 64, "BT": 32}),
    key=["T_BUCKET", "OUT", "R"])
@triton.jit
def _grad_b_kernel(dy_ptr, hg_ptr, dsb_ptr, deb_ptr,
                   T, OUT, RK, R, RANK, scaling,
                   s_dyt, s_dyn, s_dsb_n, s_dsb_j, s_deb_e, s_deb_n, s_deb_i,
                   T_BUCKET,
                   LDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BN: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    ns = pid_n * BN + tl.arange(0, BN)
    nmask = ns < OUT
    js = pid_j * BR + tl.arange(0, BR)
    jmask = js < R

    acc = tl.zeros((BN, BR), dtype=tl.float32)
    for t0 in range(0, T, BT):
        ts = t0 + tl.arange(0, BT)
        tsl = ts.to(tl.int64)
        tm = ts < T
        dyt = tl.load(dy_ptr + tsl[None, :] * s_dyt + ns[:, None] * s_dyn,
                      mask=tm[None, :] & nmask[:, None], other=0.0)
        hg = tl.load(hg_ptr + tsl[:, None] * R + js[None, :], mask=tm[:, None] & jmask[None, :], other=0.0)
        acc = _mma(dyt.to(LDT), hg.to(LDT), acc, PREC, UPCAST)
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
                      for bj, bk, bt, w, s in [(64, 128, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 128, 4, 4),
                                               (32, 256, 64, 8, 3), (64, 256, 32, 8, 3)]],
                     {"BJ": 64, "BK": 64, "BT": 32}),
    key=["T_BUCKET", "IN", "R", "NE"])
@triton.jit
def _grad_a_kernel(dh_ptr, x_ptr, dsa_ptr, dea_ptr, drw_ptr,
                   T, IN, RK, R, NE, RANK,
                   s_xt, s_xk, s_dsa_r, s_dsa_k, s_dea_e, s_dea_r, s_dea_k, s_drw_r, s_drw_k,
                   T_BUCKET,
                   LDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BJ: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    js = pid_j * BJ + tl.arange(0, BJ)
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < IN
    DH_W = R + NE

    acc = tl.zeros((BJ, BK), dtype=tl.float32)
    for t0 in range(0, T, BT):
        ts = t0 + tl.arange(0, BT)
        tsl = ts.to(tl.int64)
        tm = ts < T
        dht = tl.load(dh_ptr + tsl[None, :] * DH_W + js[:, None], mask=tm[None, :] & (js[:, None] < DH_W), other=0.0)
        x = tl.load(x_ptr + tsl[:, None] * s_xt + ks[None, :] * s_xk, mask=tm[:, None] & kmask[None, :], other=0.0)
        acc = _mma(dht.to(LDT), x.to(LDT), acc, PREC, UPCAST)
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
        self.EP = max(16, triton.next_power_of_2(self.NE))
        self.T_BUCKET = _bucket(self.T)
        self.XDT = _tl(x.dtype)
        self.ADT = _tl(expert_A.dtype)
        self.RDT = _router_dtype(x.dtype, router_weight.dtype)
        self.PREC = _fp32_precision()
        self.UPCAST = INTERPRET


def _forward(m, x, weight, bias, rw, rb, sa, sb, ea, eb, scaling):
    dev = x.device
    h = _empty((m.T, m.R), torch.float32, dev)
    hg = _empty((m.T, m.R), torch.float32, dev)
    probs = _empty((m.T, m.NE), torch.float32, dev)
    gates = _empty((m.T, m.NE), torch.float32, dev)
    idx = _empty((m.T, m.TOPK), torch.int32, dev)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]), triton.cdiv(m.R, meta["BR"]))
    _shrink_route_kernel[grid](
        x, sa, ea, rw, rb if rb is not None else rw, h, hg, probs, gates, idx,
        m.T, m.IN, m.RK, m.R, m.NE, m.RANK,
        x.stride(0), x.stride(1), sa.stride(0), sa.stride(1), ea.stride(0), ea.stride(1), ea.stride(2),
        rw.stride(0), rw.stride(1), m.T_BUCKET,
        HAS_RB=rb is not None, TOPK=m.TOPK, EP=m.EP, ADT=m.ADT, RDT=m.RDT, PREC=m.PREC, UPCAST=m.UPCAST)

    y = _empty((m.T, m.OUT), x.dtype, dev)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]) * triton.cdiv(m.OUT, meta["BN"]),)
    _base_expand_kernel[grid](
        x, weight, bias if bias is not None else weight, hg, sb, eb, y,
        m.T, m.IN, m.OUT, m.RK, m.R, m.RANK, float(scaling),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), sb.stride(0), sb.stride(1),
        eb.stride(0), eb.stride(1), eb.stride(2), y.stride(0), y.stride(1), m.T_BUCKET,
        HAS_BIAS=bias is not None, XDT=m.XDT, LDT=m.ADT, PREC=m.PREC, UPCAST=m.UPCAST)
    return y, h, hg, probs, gates, idx


def _grad_h(m, dy, sb, eb, h, probs, gates, idx, scaling):
    dh = _empty((m.T, m.R + m.NE), torch.float32, dy.device)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]),)
    _grad_h_kernel[grid](
        dy, sb, eb, h, probs, gates, idx, dh,
        m.T, m.OUT, m.RK, m.R, m.NE, m.RANK, float(scaling),
        dy.stride(0), dy.stride(1), sb.stride(0), sb.stride(1), eb.stride(0), eb.stride(1), eb.stride(2),
        m.T_BUCKET, TOPK=m.TOPK, EP=m.EP, LDT=m.ADT, PREC=m.PREC, UPCAST=m.UPCAST)
    return dh


def _grad_x(m, dy, weight, dh, sa, ea, rw, x_dtype):
    dx = _empty((m.T, m.IN), x_dtype, dy.device)
    grid = lambda meta: (triton.cdiv(m.T, meta["BT"]) * triton.cdiv(m.IN, meta["BK"]),)
    _grad_x_kernel[grid](
        dy, weight, dh, sa, ea, rw, dx,
        m.T, m.IN, m.OUT, m.RK, m.R, m.NE, m.RANK,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), sa.stride(0), sa.stride(1),
        ea.stride(0), ea.stride(1), ea.stride(2), rw.stride(0), rw.stride(1), dx.stride(0), dx.stride(1),
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
        y, h, hg, probs, gates, idx = _forward(m, x, weight, bias, router_weight, router_bias, shared_A,
                                               shared_B, expert_A, expert_B, scaling)
        ctx.meta, ctx.scaling = m, scaling
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.has_rb = router_bias is not None
        ctx.save_for_backward(x, weight, router_weight, shared_A, shared_B, expert_A, expert_B,
                              h, hg, probs, gates, idx)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rw, sa, sb, ea, eb, h, hg, probs, gates, idx = ctx.saved_tensors
        m, s = ctx.meta, ctx.scaling
        n_x, n_w, n_b, n_rw, n_rb, n_sa, n_sb, n_ea, n_eb = ctx.needs_input_grad[:9]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        d_x = d_w = d_b = d_rw = d_rb = d_sa = d_sb = d_ea = d_eb = None
        need_dh = n_x or n_rw or n_rb or n_sa or n_ea
        dh = _grad_h(m, dy, sb, eb, h, probs, gates, idx, s) if need_dh else None
        if n_x:
            d_x = _grad_x(m, dy, weight, dh, sa, ea, rw, x.dtype)
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
