"""Fused orthogonal projection in Triton: G - (G Q) Q^T, Q orthonormalised in-kernel.

Two kernels (DESIGN.md section 5):
  1. `_mgs_kernel`: one program orthonormalises the r_k rows of A_k by
     modified Gram-Schmidt with one full re-orthogonalisation pass ("twice is
     enough": orthogonal to working precision even for nearly dependent
     rows), in float64 (a few r_k^2 d_in flops; float64 keeps the basis of
     nearly dependent rows accurate). A row whose remaining norm falls below
     rtol * (largest row norm of A_k), rtol ~ max(r_k, d_in) eps_64, depends
     on the rows before it and becomes a zero row of Q, so rank-deficient A_k
     project onto their true row space only. Q is [r_k, d_in] float64 (tiny),
     read as float32 by the projection.
  2. `_project_kernel`: per block of BM rows of G, P = G_blk Q^T over d_in
     chunks, then G_blk - P Q chunk by chunk, written in G's dtype. Each
     program's block (BM x d_in) is re-read from L2 by the second loop, so G
     travels from memory once and back once: memory-bound, the limit is the
     device's copy bandwidth.

P is linear and symmetric, so the autograd Function's backward is the same
projection of the incoming gradient (the knowledge rows get no gradient).
"""

import os

import torch
import triton
import triton.language as tl

from .projection import ProjectOut

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
POISON = os.environ.get("MEDCARE_KERNELS_POISON", "0") == "1"   # tests: NaN-fill outputs before the kernels

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _empty(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan"))
    return out


def default_rtol(knowledge_A):
    """Relative rank tolerance of the float64 Gram-Schmidt: 4 max(r_k, d_in) eps_64.

    Relative to the largest row norm. As in `kernels.orthonormal_basis`, the
    tolerance is the arithmetic's, not the input dtype's: rows as stored span
    what they span, and projecting out a weak direction costs one dimension.
    """
    return 4 * max(knowledge_A.shape) * torch.finfo(torch.float64).eps


@triton.jit
def _mgs_kernel(a_ptr, q_ptr, RK, D, s_ar, s_ad, rtol, BD: tl.constexpr):
    offs = tl.arange(0, BD)
    # Copy A_k to Q (float64) and find the largest row norm (the rank scale).
    maxn2 = tl.zeros((), dtype=tl.float64)
    for i in range(0, RK):
        n2 = tl.zeros((), dtype=tl.float64)
        for d0 in range(0, D, BD):
            ds = d0 + offs
            dm = ds < D
            v = tl.load(a_ptr + i * s_ar + ds * s_ad, mask=dm, other=0.0).to(tl.float64)
            n2 += tl.sum(v * v, axis=0)
            tl.store(q_ptr + i * D + ds, v, mask=dm)
        maxn2 = tl.maximum(maxn2, n2)
    tl.debug_barrier()
    thresh = rtol * tl.sqrt(maxn2)

    for i in range(0, RK):
        row_i = q_ptr + i * D
        for rep in range(0, 2):                 # MGS, then one re-orthogonalisation pass
            for j in range(0, i):
                row_j = q_ptr + j * D
                c = tl.zeros((), dtype=tl.float64)
                for d0 in range(0, D, BD):
                    ds = d0 + offs
                    dm = ds < D
                    qj = tl.load(row_j + ds, mask=dm, other=0.0)
                    vi = tl.load(row_i + ds, mask=dm, other=0.0)
                    c += tl.sum(qj * vi, axis=0)
                for d0 in range(0, D, BD):
                    ds = d0 + offs
                    dm = ds < D
                    qj = tl.load(row_j + ds, mask=dm, other=0.0)
                    vi = tl.load(row_i + ds, mask=dm, other=0.0)
                    tl.store(row_i + ds, vi - c * qj, mask=dm)
                tl.debug_barrier()
        n2 = tl.zeros((), dtype=tl.float64)
        for d0 in range(0, D, BD):
            ds = d0 + offs
            vi = tl.load(row_i + ds, mask=ds < D, other=0.0)
            n2 += tl.sum(vi * vi, axis=0)
        nrm = tl.sqrt(n2)
        keep = nrm > thresh
        inv = tl.where(keep, 1.0 / tl.where(keep, nrm, 1.0), 0.0)
        for d0 in range(0, D, BD):
            ds = d0 + offs
            dm = ds < D
            vi = tl.load(row_i + ds, mask=dm, other=0.0)
            tl.store(row_i + ds, vi * inv, mask=dm)
        tl.debug_barrier()


def _project_configs():
    if INTERPRET:
        return [triton.Config({"BM": 32, "BD": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BM": bm, "BD": bd}, num_warps=w, num_stages=s)
            for bm, bd, w, s in [(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 8, 3), (64, 128, 8, 3),
                                 (16, 512, 8, 2), (64, 64, 4, 4), (32, 64, 4, 4), (16, 128, 4, 4)]]


def _project_prune(configs, named_args, **kwargs):
    """Drop configs whose pipelined G and Q tiles overflow shared memory (227 KB on H100/H200)."""
    esize = named_args["g_ptr"].element_size()
    rkp = named_args["RKP"] if "RKP" in named_args else kwargs.get("RKP", 64)
    cost = [c.num_stages * c.kwargs["BD"] * (c.kwargs["BM"] * esize + rkp * 8) for c in configs]
    kept = [c for c, b in zip(configs, cost) if b <= 220 * 1024]
    return kept or [configs[cost.index(min(cost))]]


@triton.autotune(configs=_project_configs(), key=["M_BUCKET", "D", "RKP"],
                 prune_configs_by={"early_config_prune": _project_prune})
@triton.jit
def _project_kernel(g_ptr, q_ptr, o_ptr, M, D, RK, s_gm, s_gd, s_om, s_od, M_BUCKET,
                    CDT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, RKP: tl.constexpr,
                    BM: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    mmask = offs_m < M
    rows = offs_m.to(tl.int64)
    rq = tl.arange(0, RKP)
    qmask = rq < RK

    p = tl.zeros((BM, RKP), dtype=tl.float32)
    for d0 in range(0, D, BD):                               # P = G Q^T
        ds = d0 + tl.arange(0, BD)
        dm = ds < D
        g = tl.load(g_ptr + rows[:, None] * s_gm + ds[None, :] * s_gd, mask=mmask[:, None] & dm[None, :], other=0.0)
        q = tl.load(q_ptr + rq[:, None] * D + ds[None, :], mask=qmask[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        if UPCAST:
            p = tl.dot(g.to(tl.float32), tl.trans(q), p, input_precision="ieee")
        else:
            p = tl.dot(g.to(CDT), tl.trans(q.to(CDT)), p, input_precision=PREC)
    pc = p.to(CDT)
    for d0 in range(0, D, BD):                               # G - P Q, chunk by chunk
        ds = d0 + tl.arange(0, BD)
        dm = ds < D
        omask = mmask[:, None] & dm[None, :]
        g = tl.load(g_ptr + rows[:, None] * s_gm + ds[None, :] * s_gd, mask=omask, other=0.0)
        q = tl.load(q_ptr + rq[:, None] * D + ds[None, :], mask=qmask[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        if UPCAST:
            corr = tl.dot(pc.to(tl.float32), q, input_precision="ieee")
        else:
            corr = tl.dot(pc, q.to(CDT), input_precision=PREC)
        out = g.to(tl.float32) - corr
        tl.store(o_ptr + rows[:, None] * s_om + ds[None, :] * s_od, out.to(o_ptr.dtype.element_ty), mask=omask)


def knowledge_rows_basis(knowledge_A, rtol=None):
    """Q [r_k, d_in] float64: orthonormal rows spanning rows(knowledge_A), zero rows for dependent ones."""
    if knowledge_A.dim() != 2:
        raise ValueError(f"knowledge_A must be [r_k, d_in], got shape {tuple(knowledge_A.shape)}")
    a = knowledge_A.detach()
    if a.dtype not in _TL_DTYPES:
        a = a.float()
    rk, d = a.shape
    q = _empty((rk, d), torch.float64, a.device)
    bd = min(triton.next_power_of_2(max(d, 16)), 64 if INTERPRET else 2048)
    _mgs_kernel[(1,)](a, q, rk, d, a.stride(0), a.stride(1),
                      float(default_rtol(knowledge_A) if rtol is None else rtol), BD=bd,
                      num_warps=4 if INTERPRET else 8)
    return q


def project_rows(grad, q):
    """grad - (grad Q^T) Q for grad [..., d_in], Q [r, d_in] (orthonormal or zero rows; read as float32)."""
    d = q.shape[1]
    if grad.shape[-1] != d:
        raise ValueError(f"grad's last dimension {grad.shape[-1]} does not match the basis' d_in {d}")
    if grad.dtype not in _TL_DTYPES:
        raise TypeError(f"the Triton projection supports fp32/bf16/fp16, got {grad.dtype}")
    g2 = grad.reshape(-1, d)
    M = g2.shape[0]
    out = _empty((M, d), grad.dtype, grad.device)
    if M == 0:
        return out.view(grad.shape)
    rk = q.shape[0]
    rkp = max(16, triton.next_power_of_2(max(rk, 1)))
    grid = lambda meta: (triton.cdiv(M, meta["BM"]),)
    _project_kernel[grid](
        g2, q, out, M, d, rk, g2.stride(0), g2.stride(1), out.stride(0), out.stride(1),
        triton.next_power_of_2(M), CDT=_TL_DTYPES[grad.dtype],
        PREC="tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3", UPCAST=INTERPRET, RKP=rkp)
    return out.view(grad.shape)


def project_out_knowledge_triton(grad, knowledge_A=None, basis=None, rtol=None):
    """grad minus its component in rows(knowledge_A), differentiable in grad (Triton).

    `basis` ([d_in, r] orthonormal columns, as from `kernels.orthonormal_basis`)
    skips the in-kernel Gram-Schmidt.
    """
    if basis is not None:
        q = basis.detach().t().contiguous()
    elif knowledge_A is not None:
        q = knowledge_rows_basis(knowledge_A, rtol)
    else:
        raise ValueError("pass knowledge_A or basis")
    return ProjectOut.apply(grad, q, project_rows)
