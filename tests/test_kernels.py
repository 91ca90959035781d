"""Kernels against independent float64 references: the Triton kernels run on the CPU
through Triton's interpreter (TRITON_INTERPRET=1), the PyTorch paths directly.

Every output buffer of the Triton path is NaN-poisoned before the kernels run
(`POISON`), so an element a kernel fails to write surfaces as a NaN.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import pytest
import torch
import torch.nn as nn

import kernels
from kernels import dispatch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"

# max |got - ref| / max |ref| per dtype (outputs; gradients get twice as much)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


@pytest.fixture
def triton_backend(monkeypatch):
    from kernels import mixture_lora_triton, projection_triton
    monkeypatch.setenv("MEDCARE_KERNELS", "triton")
    monkeypatch.setattr(mixture_lora_triton, "POISON", True)
    monkeypatch.setattr(projection_triton, "POISON", True)
    return "triton"


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("MEDCARE_KERNELS", "torch")
    return "torch"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        if not (INTERPRETED or torch.cuda.is_available()):
            pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device")
        return request.getfixturevalue("triton_backend")
    return request.getfixturevalue("torch_backend")


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values (unwritten poisoned elements?)"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


# ------------------------------------------------------------ mixture of LoRA

def reference_mixture(x, W, b, Wr, br, Ak, Bk, A, B, k, s):
    """Dense definition in float64: every expert on every token, the top-k mask applied after."""
    x, W, Wr, br, Ak, Bk, A, B = (t.double() for t in (x, W, Wr, br, Ak, Bk, A, B))
    y = x @ W.t() + (b.double() if b is not None else 0.0)
    y = y + s * (x @ Ak.t()) @ Bk.t()
    probs = torch.softmax(x @ Wr.t() + br, dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    mask = torch.zeros_like(probs).scatter(1, top_i, 1.0)
    g = probs * mask / (probs * mask).sum(-1, keepdim=True)
    per_expert = torch.einsum("eri,ti->ter", A, x)
    per_expert = torch.einsum("eor,ter->teo", B, per_expert)          # [T, E, out]
    return y + s * (g.unsqueeze(-1) * per_expert).sum(1)


def make_mixture(T, d_in, d_out, E, k, r, r_k, dtype, adapter_dtype=None, bias=True, seed=0):
    """Random layer inputs; router re-drawn until no token has a near tie at its k-th expert."""
    adapter_dtype = adapter_dtype or dtype
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=adapter_dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    x = rnd(T, d_in, dt=dtype)
    W = rnd(d_out, d_in, scale=d_in ** -0.5, dt=dtype)
    b = rnd(d_out, dt=dtype) if bias else None
    Ak, Bk = rnd(r_k, d_in, scale=d_in ** -0.5), rnd(d_out, r_k, scale=0.3)
    A, B = rnd(E, r, d_in, scale=d_in ** -0.5), rnd(E, d_out, r, scale=0.3)
    for _ in range(50):
        Wr, br = rnd(E, d_in, scale=2 * d_in ** -0.5), rnd(E, scale=0.5)
        if k == E:
            break
        p = torch.softmax(x.double() @ Wr.double().t() + br.double(), -1).sort(-1, descending=True).values
        if (p[:, k - 1] - p[:, k]).min() > 2e-3:
            break
    return [x, W, b, Wr, br, Ak, Bk, A, B]


MIXTURE_CASES = [
    # T, in, out, E, k, r, r_k, dtype, adapter dtype, bias
    (1, 32, 48, 4, 2, 4, 8, torch.float32, None, True),           # a single token
    (37, 40, 50, 5, 5, 8, 16, torch.bfloat16, None, True),        # T not a block multiple, k = E
    (40, 96, 72, 1, 1, 16, 4, torch.float16, None, False),        # E = 1, no bias
    (19, 64, 96, 3, 1, 6, 12, torch.float32, None, True),         # rank not a power of two
    (9, 48, 40, 4, 2, 4, 8, torch.bfloat16, torch.float32, True),  # bf16 base, fp32 adapters
    (6, 32, 24, 16, 3, 4, 4, torch.float32, None, True),           # E = 16 (the largest supported)
]


def _random_cases(n, seed=2024):
    """A few random shapes and dtypes (fixed seed: reproducible, still off the hand-picked grid)."""
    import random
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        E = rng.randint(1, 5)
        cases.append((rng.randint(1, 40), rng.randint(16, 96), rng.randint(16, 96), E, rng.randint(1, E),
                      rng.randint(4, 16), rng.randint(4, 16),
                      rng.choice([torch.float32, torch.bfloat16, torch.float16]), None, rng.random() < 0.5))
    return cases


MIXTURE_CASES += _random_cases(3)


@pytest.mark.parametrize("case", MIXTURE_CASES, ids=lambda c: f"T{c[0]}-E{c[3]}k{c[4]}-{str(c[7])[6:]}")
def test_mixture_forward_and_gradients_match_float64(case, backend):
    T, d_in, d_out, E, k, r, r_k, dtype, adt, bias = case
    s = 2.0
    args = make_mixture(T, d_in, d_out, E, k, r, r_k, dtype, adt, bias, seed=T * 7 + E)
    x, W, b, Wr, br, Ak, Bk, A, B = args
    trainable = [x, Wr, br, Ak, Bk, A, B]
    for t in trainable:
        t.requires_grad_(True)
    y = kernels.fused_mixture_lora(x, W, b, Wr, br, Ak, Bk, A, B, k, s)
    assert y.shape == (T, d_out) and y.dtype == dtype
    gy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(y, trainable, gy)

    leaves = [t.detach().double().requires_grad_(True) for t in trainable]
    lx, lWr, lbr, lAk, lBk, lA, lB = leaves
    ref = reference_mixture(lx, W.double(), b, lWr, lbr, lAk, lBk, lA, lB, k, s)
    ref_grads = torch.autograd.grad(ref, leaves, gy.double())

    tol = TOL[dtype]
    assert rel_err(y, ref) < tol
    for name, got, want, leaf in zip(["x", "router_weight", "router_bias", "shared_A", "shared_B",
                                      "expert_A", "expert_B"], grads, ref_grads, trainable):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        assert rel_err(got, want) < 2 * TOL[leaf.dtype] + (tol if leaf.dtype != dtype else 0), name


@needs_triton
def test_mixture_frozen_base_gets_no_gradient(triton_backend):
    x, W, b, Wr, br, Ak, Bk, A, B = make_mixture(5, 32, 24, 3, 2, 4, 8, torch.float32)
    for t in (x, Wr, Ak, B):
        t.requires_grad_(True)
    y = kernels.fused_mixture_lora(x, W, b, Wr, br, Ak, Bk, A, B, 2, 1.0)
    y.sum().backward()
    assert W.grad is None and b.grad is None
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, Wr, Ak, B))


@needs_triton
def test_mixture_trainable_base_still_correct(triton_backend):
    """Not the adapters' setting, but a base weight that does require grad gets the right one."""
    x, W, b, Wr, br, Ak, Bk, A, B = make_mixture(6, 32, 16, 2, 1, 4, 4, torch.float32)
    W.requires_grad_(True)
    b.requires_grad_(True)
    kernels.fused_mixture_lora(x, W, b, Wr, br, Ak, Bk, A, B, 1, 1.0).sum().backward()
    torch.testing.assert_close(W.grad, torch.ones(6, 16).t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, torch.full((16,), 6.0))


def test_torch_path_adapter_x_and_delta_only(torch_backend):
    """weight=None returns the adapter delta; adapter_x (dropout input) carries the adapter gradient."""
    x, W, b, Wr, br, Ak, Bk, A, B = make_mixture(7, 24, 20, 4, 2, 4, 8, torch.float64)
    xa = (x * 0.7).requires_grad_(True)
    x.requires_grad_(True)
    delta = kernels.mixture_lora_torch(x, None, None, Wr, br, Ak, Bk, A, B, 2, 1.5, adapter_x=xa)
    zero_base = torch.zeros_like(W)
    ref = reference_mixture(xa, zero_base, None, Wr, br, Ak, Bk, A, B, 2, 1.5)
    torch.testing.assert_close(delta, ref, rtol=1e-12, atol=1e-12)
    delta.sum().backward()
    assert x.grad is None and xa.grad is not None
    params = [t.requires_grad_(True) for t in (Wr, br, Ak, Bk, A, B)]
    torch.autograd.gradcheck(
        lambda xa_, *p: kernels.mixture_lora_torch(x.detach(), W, b, *p, 2, 1.5, adapter_x=xa_),
        (xa.detach().requires_grad_(True), *params))


@needs_triton
def test_mixture_layer_same_on_both_paths(monkeypatch):
    """MixtureOfLoRALinear forward and gradients agree between the PyTorch path and the kernels."""
    from medcare_dist.method.adapters import MixtureOfLoRALinear
    from kernels import mixture_lora_triton
    monkeypatch.setattr(mixture_lora_triton, "POISON", True)
    torch.manual_seed(3)
    layer = MixtureOfLoRALinear(nn.Linear(32, 40), 4, 8.0, 4, 2, 8).to(DEVICE)
    with torch.no_grad():
        layer.shared_B.normal_(0, 0.2)
        layer.expert_B.normal_(0, 0.2)
    x = torch.randn(2, 11, 32, device=DEVICE)
    out = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("MEDCARE_KERNELS", mode)
        layer.zero_grad()
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.square().sum().backward()
        out[mode] = [y, xr.grad] + [p.grad for p in (layer.router.weight, layer.expert_A, layer.shared_B)]
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------ projection

def reference_projection(G, A):
    """G - G Q Q^T in float64, Q spanning rows(A) exactly (A is built exactly rank-deficient)."""
    a = A.double()
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    q = vh[s > 1e-9 * s.max()].t()
    g = G.double()
    return g - (g @ q) @ q.t(), q


def knowledge_rows(r_k, d, seed, dependent=True):
    """Integer-valued rows (exact in every dtype) with an exactly dependent and a nearly dependent row."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-8, 9, (r_k, d), generator=g).float()
    if dependent and r_k >= 5:
        a[3] = a[0] + a[1]                    # exactly dependent: rank r_k - 1
        a[4] = a[2] + 2.0 ** -6 * torch.randint(-8, 9, (d,), generator=g).float()   # nearly dependent
    return a


PROJECTION_CASES = [
    # M, d_in, r_k, dtype
    (1, 24, 2, torch.float32),
    (37, 90, 6, torch.float32),
    (50, 130, 8, torch.bfloat16),
    (33, 64, 16, torch.float16),
    (16, 70, 5, torch.float32),
]


@pytest.mark.parametrize("case", PROJECTION_CASES, ids=lambda c: f"M{c[0]}-d{c[1]}-r{c[2]}-{str(c[3])[6:]}")
def test_projection_matches_float64(case, backend):
    M, d, r_k, dtype = case
    A = knowledge_rows(r_k, d, seed=M + d).to(dtype).to(DEVICE)
    G = torch.randn(M, d, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEVICE)
    out = kernels.project_out_knowledge(G, A)
    assert out.shape == G.shape and out.dtype == dtype
    ref, q = reference_projection(G, A)
    assert rel_err(out, ref) < 2 * TOL[dtype]
    # what is left has no component along the knowledge rows
    assert (out.double() @ q).abs().max() / G.double().abs().max() < 2 * TOL[dtype]


@needs_triton
def test_in_kernel_gram_schmidt_orthonormal_and_rank_revealing(triton_backend):
    from kernels.projection_triton import knowledge_rows_basis
    A = knowledge_rows(8, 100, seed=5)
    A[6] = 1e-4 * A[6] + A[5]                  # another nearly dependent row, still independent
    q = knowledge_rows_basis(A)
    norms = q.norm(dim=1)
    assert torch.isfinite(q).all()
    assert norms[3] == 0                       # the exactly dependent row is dropped
    assert int((norms > 0.5).sum()) == 7
    gram = q @ q.t()
    torch.testing.assert_close(gram, torch.diag((norms > 0.5).double()), atol=1e-12, rtol=0)
    # Q spans the same row space as A
    _, qref = reference_projection(A, A)
    keep = q[norms > 0.5]
    torch.testing.assert_close((keep @ qref).norm(dim=1), torch.ones(7, dtype=torch.float64), atol=1e-9, rtol=0)


def test_projection_zero_knowledge_is_identity(backend):
    G = torch.randn(5, 12, device=DEVICE)
    torch.testing.assert_close(kernels.project_out_knowledge(G, torch.zeros(3, 12, device=DEVICE)), G)


def test_projection_is_its_own_gradient(backend):
    """Used in the forward on a parameter: the gradient is projected the same way, A_k gets none."""
    A = knowledge_rows(4, 40, seed=1).to(DEVICE).requires_grad_(True)
    P = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    up = torch.randn(6, 40, device=DEVICE)
    out = kernels.project_out_knowledge(P, A.detach())
    out.backward(up)
    ref, _ = reference_projection(up, A.detach())
    assert rel_err(P.grad, ref) < 1e-5
    assert A.grad is None


def test_projection_with_cached_basis(backend):
    A = knowledge_rows(6, 50, seed=2).to(DEVICE)
    G = torch.randn(9, 50, device=DEVICE)
    basis = kernels.orthonormal_basis(A)
    assert basis.shape == (50, 5)              # the dependent row is not a direction
    ref, _ = reference_projection(G, A)
    assert rel_err(kernels.project_out_knowledge(G, basis=basis), ref) < 1e-5


@needs_triton
def test_orthogonal_layer_on_the_kernel_path(triton_backend):
    from medcare_dist.method.adapters import OrthogonalLoRALinear
    torch.manual_seed(4)
    A_k = torch.randn(4, 24)
    layer = OrthogonalLoRALinear(nn.Linear(24, 16), A_k, torch.randn(16, 4), rank=3, alpha=6.0)
    x = torch.randn(5, 24)
    layer(x).sum().backward()
    a_eff = layer.effective_align_A()
    q = kernels.orthonormal_basis(A_k)
    assert (a_eff.double() @ q).abs().max() < 1e-5
    assert (layer.align_A.grad.double() @ q).abs().max() < 1e-5


# ------------------------------------------------------------ dispatch

def test_dispatch_switch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("MEDCARE_KERNELS", "auto")
    assert not dispatch.use_triton(cpu)
    monkeypatch.setenv("MEDCARE_KERNELS", "triton")
    assert dispatch.use_triton(cpu)
    monkeypatch.setenv("MEDCARE_KERNELS", "torch")
    assert not dispatch.use_triton(cpu)
    monkeypatch.setenv("MEDCARE_KERNELS", "cuda-please")
    with pytest.raises(ValueError):
        dispatch.use_triton(cpu)


@needs_triton
def test_dispatch_reaches_the_kernels(monkeypatch):
    from kernels import mixture_lora_triton, projection_triton
    calls = []
    real_m, real_p = mixture_lora_triton.mixture_lora_triton, projection_triton.project_out_knowledge_triton
    monkeypatch.setattr(mixture_lora_triton, "mixture_lora_triton", lambda *a: calls.append("m") or real_m(*a))
    monkeypatch.setattr(projection_triton, "project_out_knowledge_triton",
                        lambda *a, **k: calls.append("p") or real_p(*a, **k))
    args = make_mixture(3, 16, 16, 2, 1, 4, 4, torch.float32)
    monkeypatch.setenv("MEDCARE_KERNELS", "auto")             # CPU tensors: PyTorch path
    kernels.fused_mixture_lora(*args, 1, 1.0)
    kernels.project_out_knowledge(torch.randn(2, 16), torch.randn(2, 16))
    assert calls == []
    monkeypatch.setenv("MEDCARE_KERNELS", "triton")
    kernels.fused_mixture_lora(*args, 1, 1.0)
    kernels.project_out_knowledge(torch.randn(2, 16), torch.randn(2, 16))
    assert calls == ["m", "p"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_routed_mask_switches_the_noise_aggregator_off_per_token(torch_backend, dtype):
    """routed_mask 0 leaves base + Knowledge Aggregator for that token (float64 dense reference), 1 the full
    mixture; gradients match the reference's, and the experts and router get a gradient tensor even when
    every token is masked (ZeRO-3 reduces the same parameters on every rank)."""
    x, W, b, Wr, br, Ak, Bk, A, B = make_mixture(11, 24, 20, 4, 2, 4, 8, dtype, seed=5)
    mask = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0], dtype=dtype)
    params = [t.requires_grad_(True) for t in (x, Wr, br, Ak, Bk, A, B)]
    y = kernels.fused_mixture_lora(x, W, b, Wr, br, Ak, Bk, A, B, 2, 1.5, routed_mask=mask)
    full = reference_mixture(x, W, b, Wr, br, Ak, Bk, A, B, 2, 1.5)
    ka_only = reference_mixture(x, W, b, Wr, br, Ak, Bk, A, torch.zeros_like(B), 2, 1.5)
    ref = torch.where(mask.bool().unsqueeze(-1), full, ka_only)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert rel_err(y, ref) < tol
    w = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad((y.double() * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), params)
    for g, r in zip(got, want):
        assert rel_err(g, r) < 2 * tol
    # Every token off: exactly the KA-only layer, and zero (not missing) gradients for experts and router.
    y0 = kernels.fused_mixture_lora(x, W, b, Wr, br, Ak, Bk, A, B, 2, 1.5, routed_mask=torch.zeros(11, dtype=dtype))
    assert rel_err(y0, ka_only) < tol
    g_wr, g_br, g_a, g_b = torch.autograd.grad(y0.sum(), [Wr, br, A, B])
    for g in (g_wr, g_br, g_a, g_b):
        assert g is not None and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 33)])
def test_silu_mul_matches_float64_and_keeps_two_tensors(dtype, shape):
    """SiluMul (sigmoid recomputed in the backward) against float64 autograd; it saves its two inputs, where
    plain autograd saves three tensors of that size."""
    from kernels.swiglu import silu_mul, silu_mul_torch

    g = torch.Generator().manual_seed(len(shape))
    gate0, up0 = (4 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    gate, up = (t.to(dtype).requires_grad_() for t in (gate0, up0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = silu_mul(gate, up)
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
    got.backward(grad_out.to(dtype))
    rg, ru = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    ref = silu_mul_torch(rg, ru)
    ref.backward(grad_out)
    tol = TOL[dtype] * 4
    scale = ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * scale)
    for leaf, r in ((gate, rg), (up, ru)):
        torch.testing.assert_close(leaf.grad.double(), r.grad, rtol=2 * tol, atol=2 * tol * r.grad.abs().max().item())
    assert len(saved) == 2
    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t) or t, lambda t: t):
        silu_mul_torch(gate, up)
    assert len({t.untyped_storage().data_ptr() for t in plain}) == 3


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fused_gated_mlp_is_the_model_it_replaces(arch):
    """use_fused_gated_mlp switches every SiLU-gated MLP; the model's loss and every input and weight gradient
    are those of the unswitched copy (float64), and its parameter names are unchanged."""
    import copy

    import transformers

    from medcare_dist.training.modeling import use_fused_gated_mlp

    cfg_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[arch]
    cfg = cfg_cls(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(cfg).double()
    fused = copy.deepcopy(plain)
    assert use_fused_gated_mlp(fused) == 2
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ids = torch.randint(0, 64, (2, 11))
    for model in (plain, fused):
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(fused(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
