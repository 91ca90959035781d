"""A LoRA layer's output `x W^T + b + scaling * dropout(x) A^T B^T` in one autograd Function.

Plain autograd (`base(x)` plus an `nn.Dropout`-ed low-rank path) keeps, per adapter, the fp32 dropout noise
and the dropped copy of the input, two [tokens, in] tensors on top of the input (on the demo's stage 2, 76 MB
of a layer's 183 MB of saved activations); its forward makes the base output and then a second [tokens, out]
sum, and its backward two [tokens, in] input gradients and their sum. `LoRALinearFunction`:

- saves the input (which the model keeps anyway: the q/k/v or gate/up adapters of a block share it), a bool
  mask, and the [tokens, r] product, and rebuilds the dropped input in the backward for the A gradient;
- writes the low-rank term into the base output in place, and the adapter's input gradient into the base's.

`dropout_keep_mask` draws the mask from 16 random bits per element, four of them per int64 draw: torch's CPU
Bernoulli draws one Mersenne-Twister number per element (67 ms for the demo's 4,096 x 1,408 down-projection
input, 2.7x that projection's GEMM; the packed draw takes 10 ms). The keep probability is rounded to a multiple
of 2^-16 and the survivors are scaled by the inverse of that rounded value, so the expectation stays exact.

The base weight is the layer's frozen backbone weight; under ZeRO-3 the adapter layer is a leaf module, so it
is gathered for the layer's forward and backward alike. `lora_linear_torch` is the reference: the same
computation in plain autograd.
"""

import math

import torch

_BITS = 16


def dropout_keep_mask(shape, p: float, device=None) -> tuple[torch.Tensor | None, float]:
    """(bool mask of kept elements, keep probability) for dropout probability p; (None, 1.0) when p rounds to 0.

    Uses torch's default generator for `device`, so torch.manual_seed and reentrant checkpointing's RNG
    replay reproduce it.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    threshold = round(p * (1 << _BITS))  # drop where the 16-bit draw falls below it
    if threshold == 0:
        return None, 1.0
    n = math.prod(shape)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (-(-n // 4),), dtype=torch.int64, device=device)
    draws = words.view(torch.int16)[:n]  # uniform on [-2^15, 2^15)
    keep = (draws >= threshold - (1 << (_BITS - 1))).view(shape)
    return keep, 1.0 - threshold / (1 << _BITS)


def dropout_input(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with dropout_keep_mask's dropout (plain autograd; for paths that take the dropped x itself)."""
    keep, keep_prob = dropout_keep_mask(x.shape, p, x.device)
    return _dropped(x, keep, keep_prob, x.dtype)


def _dropped(x2, keep2, keep_prob, dtype):
    xd = x2.to(dtype)
    return xd if keep2 is None else xd * keep2 * (1.0 / keep_prob)


class LoRALinearFunction(torch.autograd.Function):
    """x W^T + b + scaling * ((x * keep / keep_prob) A^T) B^T over [..., features]; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, keep, keep_prob):
        x2 = x.reshape(-1, x.shape[-1])
        keep2 = None if keep is None else keep.reshape(x2.shape)
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        h = _dropped(x2, keep2, keep_prob, A.dtype) @ A.t()  # the dropped copy is freed here
        if out.dtype == h.dtype:
            out.addmm_(h, B.t(), alpha=scaling)
        else:
            out += (scaling * (h @ B.t())).to(out.dtype)
        ctx.save_for_backward(x2, weight, keep2, A, B, h)
        ctx.scaling, ctx.keep_prob, ctx.x_shape, ctx.has_bias = scaling, keep_prob, x.shape, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, keep2, A, B, h = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        ga = g.to(B.dtype)
        grad_h = torch.mm(ga, B).mul_(ctx.scaling)  # [tokens, r]
        grad_bb = torch.mm(ga.t(), h).mul_(ctx.scaling) if need_bb else None
        grad_a = torch.mm(grad_h.t(), _dropped(x2, keep2, ctx.keep_prob, A.dtype)) if need_a else None
        grad_x = None
        if need_x:
            grad_x = torch.mm(g, weight)  # one buffer: the base's input gradient, then the adapter's added
            if keep2 is None and grad_x.dtype == A.dtype:
                grad_x.addmm_(grad_h, A)
            elif keep2 is None:
                grad_x += torch.mm(grad_h, A).to(grad_x.dtype)
            else:
                grad_x.addcmul_(torch.mm(grad_h, A).to(grad_x.dtype), keep2, value=1.0 / ctx.keep_prob)
            grad_x = grad_x.view(ctx.x_shape)
        # The base weight is frozen in the adapters; stay correct if it is not.
        grad_w = torch.mm(g.t(), x2).to(weight.dtype) if need_w else None
        grad_bias = g.sum(0) if (need_b and ctx.has_bias) else None
        return grad_x, grad_w, grad_bias, grad_a, grad_bb, None, None, None


def lora_linear(x, weight, bias, A, B, scaling: float, dropout_p: float = 0.0):
    """x W^T + b + scaling * dropout(x) A^T B^T (x: [..., in], weight: [out, in], A: [r, in], B: [out, r]).

    dropout_p applies to the adapter's input only; pass 0 outside training. The mask is drawn here.
    """
    keep, keep_prob = dropout_keep_mask(x.shape, dropout_p, x.device) if dropout_p > 0 else (None, 1.0)
    return LoRALinearFunction.apply(x, weight, bias, A, B, scaling, keep, keep_prob)


def lora_linear_torch(x, weight, bias, A, B, scaling: float, keep=None, keep_prob: float = 1.0):
    """The reference: the same layer in plain autograd, with a given mask."""
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x.to(A.dtype) if keep is None else x.to(A.dtype) * keep * (1.0 / keep_prob)
    return y + (scaling * ((xd @ A.t()) @ B.t())).to(y.dtype)
