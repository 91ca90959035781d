"""Packing must not change what the model learns: packed rows give every sample the loss it gets alone."""

import pytest
import torch
import torch.nn.functional as F

from medcare_dist.training.loss import install_chunked_lm_head, lm_loss_from_output
from medcare_dist.training.packing import (collate_packed, length_grouped_chunks, pack_batch, padding_stats,
                                  per_sample_sums, plan_packs, plan_rows, supports_packing)

VOCAB = 97


def tiny_qwen2(attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.float64)
    model.config._attn_implementation = attn
    return model.eval()


def samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        prompt = int(torch.randint(1, max(2, n // 2), (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def token_losses(logits, labels):
    """Per-position loss of predicting labels[t + 1] from position t (0 where unlabelled), [rows, L]."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return ce


def alone_losses(model, data):
    out = []
    for s in data:
        ids = torch.tensor([s["input_ids"]])
        lab = torch.tensor([s["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out.append(token_losses(logits, lab).sum())
    return torch.stack(out)


def test_plan_packs_fills_rows_first_fit_decreasing():
    bins = plan_packs([5, 3, 8, 2, 7, 1], 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 8, 2, 7, 1][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 26 tokens need at least 3 rows of 10
    assert plan_packs([12, 3], 10) == [[0], [1]]  # an over-long sample gets its own row


def test_plan_rows_balances_rows():
    lengths = [600, 500, 400, 300]  # first-fit decreasing: [600, 400], [500, 300] -> 2 x 1000 slots
    ffd, rows = plan_packs(lengths, 1024), plan_rows(lengths, 1024)
    slots = lambda bins: len(bins) * max(sum(lengths[i] for i in b) for b in bins)  # noqa: E731
    assert slots(ffd) == 2000 and slots(rows) == 1800  # balanced: [600, 300], [500, 400]
    assert sorted(i for b in rows for i in b) == list(range(4))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in rows)
    lengths = [900, 120, 100, 90]   # FFD: [900, 120], [100, 90] -> 2 x 1020; balanced: [900], [120, 100, 90]
    assert slots(plan_packs(lengths, 1024)) == 2040 and slots(plan_rows(lengths, 1024)) == 1800


def test_pack_batch_layout():
    data = samples([4, 3, 6], seed=1)
    b = pack_batch(data, pad_id=0, max_length=8)
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape
    assert int(b["num_tokens"]) == 13
    for i, s in enumerate(data):
        where = b["sample_index"] == i
        assert where.sum() == len(s["input_ids"])
        row = where.any(1).nonzero().item()
        cols = where[row].nonzero().squeeze(1)
        assert b["position_ids"][row, cols].tolist() == list(range(len(s["input_ids"])))
        assert b["input_ids"][row, cols].tolist() == s["input_ids"]
        assert b["labels"][row, cols[0]] == -100                      # never predicted from the previous sample
        assert b["labels"][row, cols[1:]].tolist() == s["labels"][1:]
    assert (b["labels"][b["sample_index"] < 0] == -100).all()
    # The loss-token count is that of the unpacked samples (position 0 is never predicted alone either).
    assert int((b["labels"][:, 1:] != -100).sum()) == sum(sum(t != -100 for t in s["labels"][1:]) for s in data)
    assert "attention_mask" not in collate_packed(data, 0, 8) and "sample_index" not in collate_packed(data, 0, 8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_per_sample_losses_of_unpacked(attn):
    model = tiny_qwen2(attn)
    assert supports_packing(model)
    data = samples([9, 5, 12, 3, 7, 16, 2], seed=2)
    alone = alone_losses(model, data)
    b = pack_batch(data, pad_id=0, max_length=20, pad_to_multiple_of=8)
    assert b["input_ids"].shape[0] < len(data)  # some rows really hold several samples
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
    packed = per_sample_sums(token_losses(logits, b["labels"]), b["sample_index"], len(data))
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)

    # Sanity: the same rows without restarting positions (plain concatenation) leak across samples.
    with torch.no_grad():
        leaky = model(input_ids=b["input_ids"]).logits
    leaky = per_sample_sums(token_losses(leaky, b["labels"]), b["sample_index"], len(data))
    assert not torch.allclose(leaky, alone, rtol=1e-6, atol=1e-6)


def test_packed_chunked_head_loss_and_gradients_match_unpacked():
    model = tiny_qwen2("sdpa").train()
    data = samples([6, 11, 4, 9], seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    norm_w = model.model.norm.weight
    norm_w.requires_grad_(True)  # one trainable tensor inside the backbone stands in for the adapters
    # Unpacked, plain logits.
    total = 0.0
    for s in data:
        logits = model(input_ids=torch.tensor([s["input_ids"]])).logits
        total = total + token_losses(logits, torch.tensor([s["labels"]])).sum()
    total.backward()
    ref_grad, ref_loss = norm_w.grad.clone(), total.detach()
    norm_w.grad = None
    # Packed, chunked lm_head loss.
    head = install_chunked_lm_head(model, chunk_tokens=5)
    b = collate_packed(data, pad_id=0, max_length=16)
    with head.loss_for(b["labels"]):
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"])
    loss = lm_loss_from_output(out)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(norm_w.grad, ref_grad, rtol=1e-8, atol=1e-10)
    assert int(head.last_num_tokens) == sum(sum(t != -100 for t in s["labels"][1:]) for s in data)


def test_length_grouping_fallback():
    lengths = [5, 50, 7, 48, 6, 49, 8, 51]
    chunks = length_grouped_chunks(list(range(8)), lengths, num_chunks=2, chunk_size=4)
    assert sorted(i for c in chunks for i in c) == list(range(8))
    grouped = padding_stats(lengths, chunks)
    naive = padding_stats(lengths, [[0, 1, 2, 3], [4, 5, 6, 7]])
    packed = padding_stats(lengths, [[0, 1, 2, 3], [4, 5, 6, 7]], max_length=64, packed=True)
    assert grouped["padding_fraction"] < naive["padding_fraction"]
    assert packed["padding_fraction"] < naive["padding_fraction"]
    assert grouped["real_tokens"] == naive["real_tokens"] == packed["real_tokens"] == sum(lengths)
