"""The adapter layers of the MedCare method, each wrapping one frozen nn.Linear.

- `LoRALinear`: plain LoRA. Stage 1 puts it on the attention projections;
  after the TAIA merge it also carries the Knowledge Aggregator on MLPs.
- `MixtureOfLoRALinear`: stage 1's MLP layer, the always-on Knowledge
  Aggregator plus the routed Noise Aggregator.
- `OrthogonalLoRALinear`: stage 2's MLP layer, the Knowledge Aggregator plus a
  new alignment LoRA kept orthogonal to the knowledge subspace.

Every layer keeps the frozen base as `self.base` and is registered as a
ZeRO-3 leaf module by the trainer, so DeepSpeed gathers the base, router and
adapter tensors together before the forward that reads them all.
"""

import math

import torch
import torch.nn as nn

from kernels import fused_mixture_lora, mixture_lora_torch, project_out_knowledge, route_top_k
from kernels.lora_linear import dropout_input, lora_linear
from kernels.projection import orthonormal_basis

ORTHOGONALITY_MODES = ("hard", "soft", "both", "none")


class _AttachPenalty(torch.autograd.Function):
    """Identity on `y` whose backward also sends `grad_scale` into `penalty`.

    Adds d(penalty)/d(params) to the parameters' gradients exactly as if the
    penalty were added to the loss, but from inside the layer: this still
    works under reentrant gradient checkpointing (whose first forward runs
    without autograd, so a penalty tensor stashed on the module would carry no
    graph) and under ZeRO-3 (the parameters are gathered while the layer's
    backward runs).
    """

    @staticmethod
    def forward(ctx, y, penalty, grad_scale):
        ctx.grad_scale = grad_scale
        ctx.penalty_dtype = penalty.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        g = torch.full((), ctx.grad_scale, dtype=ctx.penalty_dtype, device=grad_y.device)
        return grad_y, g, None


class _AdapterBase(nn.Module):
    """Shared plumbing: the frozen base linear, input flattening, penalties."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        # Multiplies penalty gradients; the trainer sets it to 1/grad_accum
        # (times the loss scale under fp16) so a penalty weighs what a loss
        # term would after DeepSpeed scales the loss.
        self.penalty_grad_scale = 1.0
        self.last_penalty = None  # detached value of the latest penalty, for logs

    def _with_penalty(self, y, penalty):
        self.last_penalty = penalty.detach()
        if torch.is_grad_enabled() and penalty.requires_grad:
            return _AttachPenalty.apply(y, penalty, self.penalty_grad_scale)
        return y


def _init_lora_pair(A: torch.Tensor, B: torch.Tensor):
    """Kaiming-uniform A (as nn.Linear initialises its weight), zero B."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


class LoRALinear(_AdapterBase):
    """y = base(x) + scaling * dropout(x) A^T B^T (dropout on the adapter's input only, while training).

    `role` says where it sits in the method: "attention" (stage 1's q/k/v/o
    LoRA, merged by the TAIA step) or "knowledge" (the Knowledge Aggregator
    carried on an MLP projection between the stages).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 role: str = "attention", scaling: float | None = None):
        super().__init__(base)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank = rank
        self.scaling = alpha / rank if scaling is None else scaling
        self.role = role
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=weight.dtype, device=weight.device))
        _init_lora_pair(self.lora_A, self.lora_B)
        self.dropout_p = float(dropout)

    def forward(self, x):
        return lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                           self.dropout_p if self.training else 0.0)

    def delta_weight(self):
        """scaling * B A, the dense update this adapter adds to the base weight."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def spec(self):
        return {"type": "LoRALinear", "role": self.role, "rank": self.rank, "scaling": self.scaling,
                "dropout": self.dropout_p}

    @classmethod
    def from_spec(cls, base, spec):
        return cls(base, spec["rank"], alpha=0.0, dropout=spec.get("dropout", 0.0),
                   role=spec["role"], scaling=spec["scaling"])


class MixtureOfLoRALinear(_AdapterBase):
    """Stage 1 MLP projection: Knowledge Aggregator + routed Noise Aggregator.

    y = base(x) + scaling * (x A_k^T B_k^T + sum_{e in topk(x)} g_e(x) x A_e^T B_e^T),
    g = softmax(router(x)) restricted to the top-k and renormalised to sum 1.
    The E routed experts are stored stacked (`expert_A` [E, r, in],
    `expert_B` [E, out, r]) so every ZeRO-3 rank produces a gradient for
    them whichever experts its tokens chose; otherwise the reduce-scatter of
    an unused expert never fires and the job hangs.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, num_experts: int, top_k: int,
                 shared_rank: int, dropout: float = 0.0, aux_loss_coef: float = 0.0):
        super().__init__(base)
        if rank <= 0 or shared_rank <= 0:
            raise ValueError(f"ranks must be positive, got rank={rank}, shared_rank={shared_rank}")
        if num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.rank, self.shared_rank = rank, shared_rank
        self.num_experts, self.top_k = num_experts, top_k
        self.scaling = alpha / rank
        self.aux_loss_coef = aux_loss_coef
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        d_in, d_out = self.in_features, self.out_features
        self.router = nn.Linear(d_in, num_experts, bias=True, **kw)
        self.shared_A = nn.Parameter(torch.empty(shared_rank, d_in, **kw))
        self.shared_B = nn.Parameter(torch.zeros(d_out, shared_rank, **kw))
        self.expert_A = nn.Parameter(torch.empty(num_experts, rank, d_in, **kw))
        self.expert_B = nn.Parameter(torch.zeros(num_experts, d_out, rank, **kw))
        _init_lora_pair(self.shared_A, self.shared_B)
        for e in range(num_experts):
            _init_lora_pair(self.expert_A.data[e], self.expert_B.data[e])
        self.dropout_p = float(dropout)
        # Tokens routed to each expert since the last `pop_expert_counts`.
        self.expert_counts = torch.zeros(num_experts, dtype=torch.long)
        # The trainer switches the Noise Aggregator off for some micro-batches (adapters.noise_drop_prob),
        # so that the Knowledge Aggregator learns to stand alone, as it must after the TAIA step.
        self.noise_off = False

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = x2.to(self.expert_A.dtype)
        noise_off = self.noise_off and self.training
        # All-zero gates rather than skipping the experts: they and the router still get a (zero)
        # gradient, so every ZeRO-3 rank reduces the same parameters whichever micro-batches dropped.
        routed_mask = xa.new_zeros(xa.shape[0]) if noise_off else None
        track = torch.is_grad_enabled() and not noise_off  # once per micro-step, even with checkpoint recompute
        aux = self.aux_loss_coef > 0 and not noise_off
        if track or aux:
            with torch.set_grad_enabled(track and aux):
                probs, topk_idx, _ = route_top_k(xa, self.router.weight, self.router.bias, self.top_k)
            if track:
                counts = torch.bincount(topk_idx.flatten(), minlength=self.num_experts)
                self.expert_counts = self.expert_counts.to(counts.device) + counts
        args = (self.router.weight, self.router.bias, self.shared_A, self.shared_B,
                self.expert_A, self.expert_B, self.top_k, self.scaling)
        if self.dropout_p > 0 and self.training:
            y = self.base(x2)
            delta = mixture_lora_torch(x2, None, None, *args, adapter_x=dropout_input(xa, self.dropout_p),
                                       routed_mask=routed_mask)
            y = y + delta.to(y.dtype)
        else:
            y = fused_mixture_lora(x2, self.base.weight, self.base.bias, *args, routed_mask=routed_mask)
        if aux and track:
            y = self._with_penalty(y, self.aux_loss_coef * switch_balance_loss(probs, topk_idx))
        return y.view(*shape[:-1], self.out_features)

    def spec(self):
        return {"type": "MixtureOfLoRALinear", "rank": self.rank, "scaling": self.scaling,
                "num_experts": self.num_experts, "top_k": self.top_k, "shared_rank": self.shared_rank,
                "dropout": self.dropout_p, "aux_loss_coef": self.aux_loss_coef}

    @classmethod
    def from_spec(cls, base, spec):
        return cls(base, spec["rank"], spec["scaling"] * spec["rank"], spec["num_experts"], spec["top_k"],
                   spec["shared_rank"], spec.get("dropout", 0.0), spec.get("aux_loss_coef", 0.0))


def switch_balance_loss(probs, topk_idx):
    """Switch-Transformer load-balancing loss E * sum_e f_e * P_e (1 when balanced).

    f_e: fraction of the T*k routing assignments that went to expert e (no
    gradient); P_e: mean router probability of expert e (carries the gradient).
    """
    num_experts = probs.shape[-1]
    counts = torch.bincount(topk_idx.flatten(), minlength=num_experts).to(probs.dtype)
    frac = counts / counts.sum()
    return num_experts * (frac * probs.mean(dim=0)).sum()


class OrthogonalLoRALinear(_AdapterBase):
    """Stage 2 MLP projection: Knowledge Aggregator + orthogonal alignment LoRA.

    y = base(x) + scaling * (x A_k^T B_k^T + x A_a^T B_a^T).

    orthogonality:
    - "hard": the alignment A that enters the forward is P(align_A), P the
      projection onto the orthogonal complement of rows(A_k). Its gradient is
      therefore projected too (P is symmetric), and because the projection is
      re-applied to the parameter every forward, no optimizer (AdamW's
      per-coordinate scaling, decoupled weight decay, ZeRO's fp32 master
      copies) can move the effective A_a out of the complement. With a
      trainable A_k (the paper's setting) the basis follows A_k; frozen, it is
      computed once and cached.
      With a `protected_basis` U ([in, k], adapters.protect_inputs_energy) the
      complement is that of rows(A_k) + span(U), U the principal directions of
      the knowledge data's inputs to this layer (GPM / InfLoRA style): then
      the alignment adapter also barely responds to knowledge inputs, which
      orthogonality to rows(A_k) alone does not give.
    - "soft": the paper's penalty lambda * sum |A_k A_a^T|_1, injected into
      the backward from inside the layer so it trains under ZeRO-3 too.
    - "both", "none".
    """

    def __init__(self, base: nn.Linear, knowledge_A: torch.Tensor, knowledge_B: torch.Tensor, rank: int,
                 alpha: float, orthogonality: str = "hard", freeze_knowledge: bool = False,
                 orthogonality_lambda: float = 1.0, dropout: float = 0.0, protected_basis: torch.Tensor | None = None):
        super().__init__(base)
        if orthogonality not in ORTHOGONALITY_MODES:
            raise ValueError(f"orthogonality must be one of {ORTHOGONALITY_MODES}, got {orthogonality!r}")
        if rank <= 0:
            raise ValueError(f"alignment rank must be positive, got {rank}")
        r_k, d_in = knowledge_A.shape
        if d_in != self.in_features or tuple(knowledge_B.shape) != (self.out_features, r_k):
            raise ValueError(
                f"knowledge adapter shapes A {tuple(knowledge_A.shape)}, B {tuple(knowledge_B.shape)} do not fit "
                f"a linear of in={self.in_features}, out={self.out_features}")
        r_p = 0 if protected_basis is None else protected_basis.shape[1]
        if protected_basis is not None and protected_basis.shape[0] != d_in:
            raise ValueError(f"protected input basis {tuple(protected_basis.shape)} does not fit in_features={d_in}")
        if orthogonality in ("hard", "both") and rank > d_in - r_k - r_p:
            raise ValueError(f"alignment rank {rank} exceeds the complement of the knowledge subspace "
                             f"(in_features {d_in} - knowledge rank {r_k} - protected input directions {r_p})")
        self.rank, self.knowledge_rank, self.protected_rank = rank, r_k, r_p
        self.scaling = alpha / rank
        self.orthogonality = orthogonality
        self.orthogonality_lambda = orthogonality_lambda
        self.freeze_knowledge = freeze_knowledge
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.knowledge_A = nn.Parameter(knowledge_A.detach().to(**kw).clone(), requires_grad=not freeze_knowledge)
        self.knowledge_B = nn.Parameter(knowledge_B.detach().to(**kw).clone(), requires_grad=not freeze_knowledge)
        self.align_A = nn.Parameter(torch.empty(rank, d_in, **kw))
        self.align_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        _init_lora_pair(self.align_A, self.align_B)
        # Principal directions of the knowledge data's inputs to this layer (adapters.protect_inputs_energy),
        # projected out of the alignment A with rows(A_k): fixed, saved with the adapters.
        self.register_parameter("protected_basis", None if protected_basis is None else nn.Parameter(
            protected_basis.detach().to(**kw).clone(), requires_grad=False))
        self._basis, self._basis_key = None, None  # cache while A_k is frozen
        if self.projects:
            with torch.no_grad():
                self.align_A.copy_(project_out_knowledge(self.align_A, basis=orthonormal_basis(self._protected_rows())))
        self.dropout_p = float(dropout)

    @property
    def projects(self):
        return self.orthogonality in ("hard", "both")

    def _protected_rows(self):
        """rows(A_k), and the protected input directions when there are any: what A_a is kept orthogonal to."""
        a = self.knowledge_A.detach()
        return a if self.protected_basis is None else torch.cat([a, self.protected_basis.to(a.dtype).t()])

    def knowledge_basis(self):
        """Orthonormal basis [in, r] of rows(A_k) (plus the protected input directions); cached while A_k is
        frozen."""
        if not self.freeze_knowledge:
            return orthonormal_basis(self._protected_rows())
        a, p = self.knowledge_A, self.protected_basis
        # Keyed on the storage and its version: loading new values (or a
        # ZeRO-3 re-gather into new storage) invalidates the cache.
        key = tuple((t.data_ptr(), t._version, t.device) for t in (a, p) if t is not None)
        if self._basis is None or self._basis_key != key:
            self._basis, self._basis_key = orthonormal_basis(self._protected_rows()), key
        return self._basis

    def effective_align_A(self):
        """The alignment A that enters the forward pass (projected in hard mode)."""
        if not self.projects:
            return self.align_A
        if self.freeze_knowledge or self.protected_basis is not None:
            return project_out_knowledge(self.align_A, basis=self.knowledge_basis())
        return project_out_knowledge(self.align_A, self.knowledge_A.detach())

    def forward(self, x):
        align_A = self.effective_align_A()
        a_stack = torch.cat([self.knowledge_A, align_A], dim=0)  # one [tokens, r_k + r] product for both
        b_stack = torch.cat([self.knowledge_B, self.align_B], dim=1)
        p = self.dropout_p if self.training else 0.0
        y = lora_linear(x, self.base.weight, self.base.bias, a_stack, b_stack, self.scaling, p)
        if self.orthogonality in ("soft", "both") and torch.is_grad_enabled():
            penalty = self.orthogonality_lambda * (self.knowledge_A @ align_A.t()).abs().sum()
            y = self._with_penalty(y, penalty)
        return y

    def delta_weight(self):
        a = torch.cat([self.knowledge_A, self.effective_align_A()], dim=0).float()
        b = torch.cat([self.knowledge_B, self.align_B], dim=1).float()
        return self.scaling * (b @ a)

    def spec(self):
        return {"type": "OrthogonalLoRALinear", "rank": self.rank, "knowledge_rank": self.knowledge_rank,
                "scaling": self.scaling, "orthogonality": self.orthogonality,
                "orthogonality_lambda": self.orthogonality_lambda, "freeze_knowledge": self.freeze_knowledge,
                "dropout": self.dropout_p, "protected_rank": self.protected_rank}

    @classmethod
    def from_spec(cls, base, spec):
        d_in, d_out, r_k = base.in_features, base.out_features, spec["knowledge_rank"]
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        # Real values are loaded right after; these only give the shapes.
        r_p = spec.get("protected_rank", 0)
        q = torch.linalg.qr(torch.randn(d_in, r_k + r_p, dtype=torch.float64))[0].to(**kw)
        return cls(base, q[:, :r_k].t().contiguous(), torch.zeros(d_out, r_k, **kw), spec["rank"],
                   spec["scaling"] * spec["rank"], spec["orthogonality"], spec["freeze_knowledge"],
                   spec["orthogonality_lambda"], spec.get("dropout", 0.0),
                   q[:, r_k:].contiguous() if r_p else None)


ADAPTER_TYPES = {cls.__name__: cls for cls in (LoRALinear, MixtureOfLoRALinear, OrthogonalLoRALinear)}

