"""The chunked loss must equal plain cross-entropy: values and gradients, shifts and ignored labels."""

import pytest
import torch
import torch.nn.functional as F

from medcare_dist.training.loss import (ChunkedLMHead, auto_chunk_tokens, chunked_causal_lm_loss, install_chunked_lm_head,
                               lm_loss_from_output, next_token_targets)


def reference(hidden, weight, labels):
    """Plain causal-LM loss, the way HF / the reference compute it: full logits, shifted copy, fp64 here."""
    logits = hidden.double() @ weight.double().t()
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def random_case(seed, B=3, T=19, H=16, V=53, dtype=torch.float32, weight_grad=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :7] = -100           # a prompt
    labels[1, -4:] = -100          # padding
    labels[-1, ::3] = -100         # scattered
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000, None])
def test_values_and_gradients_match_plain_cross_entropy(chunk):
    hidden, weight, labels = random_case(0, dtype=torch.float64, weight_grad=True)
    loss, n = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk)
    (1.7 * loss).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = reference(hidden, weight, labels)
    (1.7 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-10, atol=1e-12)
    assert int(n) == int((labels[:, 1:] != -100).sum())


def test_fp32_against_fp64_reference_and_frozen_weight():
    hidden, weight, labels = random_case(1, B=2, T=33, H=24, V=301)
    loss, _ = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=8)
    loss.backward()
    assert weight.grad is None  # frozen lm_head: no weight gradient is built
    h64 = hidden.detach().double().requires_grad_(True)
    ref = reference(h64, weight.detach().double(), labels)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)


def test_bf16_upcasts_per_chunk():
    hidden, weight, labels = random_case(2, B=2, T=40, H=32, V=211)
    hb = hidden.detach().bfloat16().requires_grad_(True)
    loss, _ = chunked_causal_lm_loss(hb, weight.bfloat16(), labels, chunk_tokens=16)
    loss.backward()
    assert loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
    ref = reference(hb.detach(), weight.bfloat16(), labels)  # same bf16 inputs, exact arithmetic
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=0.5)


def test_unshifted_targets_and_helpers():
    hidden, weight, labels = random_case(3, dtype=torch.float64)
    targets = next_token_targets(labels)
    assert (targets[:, -1] == -100).all() and torch.equal(targets[:, :-1], labels[:, 1:])
    a, _ = chunked_causal_lm_loss(hidden, weight, labels)
    b, _ = chunked_causal_lm_loss(hidden, weight, targets, shift=False)
    torch.testing.assert_close(a, b)
    assert auto_chunk_tokens(151936, "cuda") * 151936 * 4 <= 2**30
    assert auto_chunk_tokens(32000) * 32000 * 4 <= 16 * 2**20 and auto_chunk_tokens(10**9) == 128


def test_all_ignored_and_bad_labels():
    hidden, weight, labels = random_case(4)
    loss, n = chunked_causal_lm_loss(hidden, weight, torch.full_like(labels, -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(n) == 0 and float(hidden.grad.abs().sum()) == 0.0
    bad = labels.clone()
    bad[0, 10] = weight.shape[0]
    with pytest.raises(ValueError, match="label ids"):
        chunked_causal_lm_loss(hidden, weight, bad)


def test_no_full_vocabulary_logits(monkeypatch):
    """Every matmul in the loss is at most chunk_tokens rows tall."""
    hidden, weight, labels = random_case(5, B=4, T=64, H=8, V=97)
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        if out.dim() == 2 and out.shape[-1] == weight.shape[0]:
            seen.append(out.shape[0])
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    loss, n = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=10)
    loss.backward()
    assert seen and max(seen) <= 10 and sum(seen) == int(n)


def test_chunked_head_is_a_linear_outside_loss_for():
    lin = torch.nn.Linear(8, 31, bias=False)
    head = ChunkedLMHead(lin, chunk_tokens=4)
    assert head.weight is lin.weight
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(head(x), lin(x))
    labels = torch.randint(0, 31, (2, 5))
    with head.loss_for(labels):
        loss = head(x)
    ref = reference(x, lin.weight.detach(), labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    assert head._labels is None

    class Out:
        logits = head(x)

    with pytest.raises(RuntimeError, match="loss_for"):
        lm_loss_from_output(Out)


def test_install_on_hf_model_keeps_the_weight():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=41, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    w = model.lm_head.weight
    head = install_chunked_lm_head(model, chunk_tokens=3)
    assert model.lm_head is head and head.weight is w and install_chunked_lm_head(model) is head
    assert [n for n, _ in model.named_parameters()].count("lm_head.weight") == 1


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_correct_counts_equal_argmax_of_full_logits(chunk):
    from medcare_dist.training.trainer import token_correct

    hidden, weight, labels = random_case(3)
    logits = hidden.double() @ weight.double().t()
    # Make about half the labelled positions right: position t - 1's argmax becomes label t.
    best = logits.argmax(-1)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1], 2):
            if labels[b, t] != -100:
                labels[b, t] = best[b, t - 1]
    target = labels[:, 1:]
    want = int(((logits[:, :-1].argmax(-1) == target) & (target != -100)).sum())
    assert 0 < want < int((target != -100).sum())
    correct = torch.zeros((), dtype=torch.int64)
    loss, _ = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk, correct=correct)
    assert int(correct) == want and int(token_correct(logits, labels)) == want
    torch.testing.assert_close(loss.double(), reference(hidden, weight, labels), rtol=1e-5, atol=1e-4)
    head = ChunkedLMHead(torch.nn.Linear(16, 53, bias=False), chunk_tokens=chunk)
    head.weight = torch.nn.Parameter(weight.detach().clone())
    with head.loss_for(labels, count_correct=True):
        head(hidden)
    assert int(head.last_num_correct) == want
    with head.loss_for(labels):
        head(hidden)
    assert head.last_num_correct is None
