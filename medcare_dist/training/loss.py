"""Next-token cross-entropy that never holds fp32 logits for the whole vocabulary at once.

The plain way (`logits = lm_head(h).float()`, a shifted `.contiguous()` copy,
`F.cross_entropy`) keeps [tokens, vocab] fp32 tensors alive: for a 152k
vocabulary and 4 x 3072 tokens that is 7.5 GB per copy. Here:

- only positions whose *next* token is labelled are projected at all (prompt
  tokens, padding and the last position of each row carry no loss, so their
  logits are never computed);
- those positions go through the lm_head `chunk_tokens` at a time; each
  chunk's logits are upcast to fp32, reduced to log-sum-exp and the target
  logit, and turned into d(loss)/d(logits) = softmax - onehot on the spot;
- the gradient with respect to the hidden states (and to the lm_head weight,
  only if it requires grad) is accumulated chunk by chunk *in the forward*,
  so the backward is a scale by the incoming scalar gradient. No logits are
  saved and none are recomputed: the lm_head costs the same two GEMMs as the
  plain way (logits, and dlogits @ W) over fewer rows, with O(chunk x vocab)
  extra memory plus one [tokens, hidden] gradient buffer.

`chunked_causal_lm_loss` is the function; `ChunkedLMHead` is a drop-in
replacement for a causal LM's `lm_head` that returns the summed loss instead
of logits while labels are set (`with head.loss_for(labels): out = model(...)`),
so the loss is computed inside the lm_head module's forward: under ZeRO-3 the
module's hooks gather the partitioned weight for exactly that call.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = None  # auto: see CHUNK_BUDGET_BYTES


# Bytes of fp32 logits per chunk when chunk_tokens is None. On a GPU every chunk re-reads the whole lm_head
# weight (622 MB for 152k x 2048 in bf16), so chunks must be tall enough for the GEMMs to stay compute-bound.
# On a CPU (one thread per rank) 128 rows already run at full speed (3,000 rows, 32k vocabulary: 1.86 s at 128
# rows, 1.83 s at 524; at 152k, 2.89 s at 128 rows, 3.64 s at 64) and small chunks keep the step's peak low.
CHUNK_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}
MIN_CHUNK_TOKENS = 128


def auto_chunk_tokens(vocab_size: int, device="cpu", budget_bytes: int | None = None) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about `budget_bytes`, at least MIN_CHUNK_TOKENS."""
    if budget_bytes is None:
        budget_bytes = CHUNK_BUDGET_BYTES.get(torch.device(device).type, CHUNK_BUDGET_BYTES["cpu"])
    return max(MIN_CHUNK_TOKENS, budget_bytes // (4 * vocab_size))


def next_token_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """targets[b, t] = labels[b, t + 1], the last position of each row set to `ignore_index`.

    Same length as `labels`, so hidden states [B, T, H] can be flattened to a
    view instead of sliced to T - 1 and copied.
    """
    targets = torch.full_like(labels, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    return targets


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over selected rows of CE(h W^T, target), gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk_tokens, correct=None):
        # hidden [N, H]; weight [V, H]; rows: int64 indices into hidden; targets: [len(rows)] int64;
        # correct: None, or a 0-dim int64 tensor that gets the count of rows whose argmax is the target.
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)   # fp32, or fp64 for fp64 inputs
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        d_hidden = torch.zeros_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, rows.numel(), chunk_tokens):
            idx = rows[start:start + chunk_tokens]
            tgt = targets[start:start + chunk_tokens]
            h = hidden.index_select(0, idx)
            logits = (h @ weight.t()).to(acc)                                    # [c, V] fp32
            target_logit = logits.gather(1, tgt.unsqueeze(1)).squeeze(1)
            if correct is not None:
                correct += (logits.argmax(dim=-1) == tgt).sum().to(correct.device)
            # log-sum-exp and softmax in the one buffer (torch.logsumexp would make a second [c, V] tensor)
            top = logits.amax(dim=-1, keepdim=True)
            total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)          # logits now exp(z - max)
            loss += (top.squeeze(1) + total.log().squeeze(1) - target_logit).sum()
            if need_h or need_w:
                probs = logits.div_(total)                                       # softmax, in place
                probs[torch.arange(idx.numel(), device=idx.device), tgt] -= 1.0  # d loss / d logits
                g = probs if probs.dtype == weight.dtype else probs.to(weight.dtype)
                if need_h:
                    d_hidden.index_copy_(0, idx, (g @ weight).to(hidden.dtype))
                if need_w:
                    d_weight.addmm_(probs.t(), h.to(acc))
                del g
            del logits
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        gh = gw = None
        if d_hidden is not None:
            gh = d_hidden * grad_loss.to(d_hidden.dtype)
        if d_weight is not None:
            gw = (d_weight * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                           chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS, ignore_index: int = IGNORE_INDEX,
                           shift: bool = True, correct: torch.Tensor | None = None):
    """(loss_sum, n_tokens): next-token cross-entropy summed over labelled positions.

    hidden_states: [B, T, H] (or [N, H]) final hidden states, before the lm_head.
    lm_head_weight: [V, H]; frozen or trainable (its gradient is built only if
    it requires grad). labels: [B, T] token ids, `ignore_index` where no loss
    is wanted; with `shift` (the HF causal-LM convention) position t predicts
    labels[t + 1]; without it labels are already the targets of each position.
    Equals `F.cross_entropy(logits[:, :-1].float(), labels[:, 1:], reduction="sum")`
    over the labelled positions; n_tokens is their count (a 0-dim int64 tensor).
    Never more than `chunk_tokens` x V logits exist at once (None: 16 MiB of fp32 on a CPU, 1 GiB on a GPU,
    at least 128 rows).
    `correct` (a 0-dim int64 tensor) gets the number of labelled positions whose argmax is their label
    added to it: token accuracy from the same logits, for validation.
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = next_token_targets(labels, ignore_index) if shift else labels
    targets = targets.reshape(-1).to(hidden.device)
    if targets.numel() != hidden.shape[0]:
        raise ValueError(f"labels give {targets.numel()} positions, hidden states {hidden.shape[0]}")
    rows = (targets != ignore_index).nonzero().squeeze(1)
    tgt = targets.index_select(0, rows).long()
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(lm_head_weight.shape[0], hidden.device)
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= lm_head_weight.shape[0]):
        raise ValueError(f"label ids must lie in [0, {lm_head_weight.shape[0]}) or equal {ignore_index}")
    loss = _LinearCrossEntropy.apply(hidden, lm_head_weight, rows, tgt, int(chunk_tokens), correct)
    return loss, torch.tensor(rows.numel(), dtype=torch.int64)


class ChunkedLMHead(nn.Module):
    """A causal LM's lm_head that returns the chunked loss sum instead of logits while labels are set.

    Holds the *same* weight Parameter as the nn.Linear it replaces (so
    checkpoints, ZeRO-3 partitioning and tying are untouched). Outside
    `loss_for(...)` it is a plain linear layer and returns logits, so
    evaluation and generation keep working.
    """

    def __init__(self, linear: nn.Linear, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("ChunkedLMHead supports lm_heads without bias (Qwen, Llama)")
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.chunk_tokens = chunk_tokens
        self._labels = None
        self._count_correct = False
        self.last_num_tokens = None
        self.last_num_correct = None  # set under loss_for(labels, count_correct=True)

    @contextlib.contextmanager
    def loss_for(self, labels: torch.Tensor, count_correct: bool = False):
        """While active, forward(h) returns the summed next-token loss of h against `labels` (and, with
        count_correct, leaves the number of correctly predicted labels in last_num_correct)."""
        self._labels, self._count_correct = labels, count_correct
        try:
            yield self
        finally:
            self._labels, self._count_correct = None, False

    def forward(self, hidden_states):
        if self._labels is None:
            return F.linear(hidden_states, self.weight)
        correct = torch.zeros((), dtype=torch.int64, device=hidden_states.device) if self._count_correct else None
        loss, n = chunked_causal_lm_loss(hidden_states, self.weight, self._labels, self.chunk_tokens, correct=correct)
        self.last_num_tokens, self.last_num_correct = n, correct
        return loss

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, chunk_tokens={self.chunk_tokens}"


def install_chunked_lm_head(model: nn.Module, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> ChunkedLMHead:
    """Replace `model.lm_head` (an nn.Linear) by a ChunkedLMHead sharing its weight; returns it.

    Do this before deepspeed.initialize so ZeRO-3 registers its hooks on the
    new module. Idempotent.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
    if isinstance(head, ChunkedLMHead):
        head.chunk_tokens = chunk_tokens
        return head
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expected an nn.Linear lm_head, got {type(head).__name__}")
    new = ChunkedLMHead(head, chunk_tokens)
    if hasattr(model, "set_output_embeddings"):
        model.set_output_embeddings(new)
    else:
        model.lm_head = new
    return new


def lm_loss_from_output(output) -> torch.Tensor:
    """The loss sum a model with a ChunkedLMHead returned (in the `logits` field) under `loss_for`."""
    loss = output.logits if hasattr(output, "logits") else output[0]
    if loss.dim() != 0:
        raise RuntimeError("the model returned logits, not a loss: call it inside `head.loss_for(labels)` "
                           "after install_chunked_lm_head")
    return loss
