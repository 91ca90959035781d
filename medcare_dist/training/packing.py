"""Padding-free batches: sequence packing with per-sample attention, and length grouping as a fallback.

Packing puts several tokenized samples into one row of at most `max_length`
tokens. Three things keep each sample independent of its row-mates:

- `position_ids` restart at 0 at every sample. With `attention_mask=None`,
  transformers (>= 4.53, checked on 5.24: `masking_utils.find_packed_sequence_indices`)
  reads the restarts as sample boundaries and builds a block-diagonal causal
  mask for the `sdpa` and `eager` kernels; `flash_attention_2` turns the same
  position_ids into varlen `cu_seqlens` and never computes across samples.
  So a packed batch must be fed WITHOUT an attention mask (a 2D mask would
  switch the detection off).
- RoPE sees each sample at positions 0..n-1, exactly as when it is alone.
- The label of each sample's first token is set to -100: in the shifted
  causal-LM loss that label is what the *previous* sample's last position
  would predict. (Alone, position 0 is never predicted either, so the loss
  tokens, their count and every per-sample loss are unchanged.)

The tail of a row is padding that forms its own "sample" (positions 0..p-1,
labels -100): real tokens never attend to it.

Which samples form a micro-batch is not changed (the trainer's batch of step s
stays a pure function of the seed and s); packing only lays them out in fewer,
fuller rows. `length_grouped_chunks` is the fallback for attention backends
that cannot take packed rows: it orders the samples of a global batch by
length before they are cut into micro-batches, so little padding remains.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Attention implementations of transformers that honour packed position_ids.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def plan_packs(lengths: list[int], max_length: int) -> list[list[int]]:
    """Bins of sample indices, each summing to at most max_length tokens (first-fit decreasing).

    Deterministic: ties are broken by index, and each bin lists its samples in
    index order. A sample longer than max_length gets a bin of its own (the
    data loader truncates to max_length, so this only happens when the caller
    packs to a shorter length).
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    return [sorted(b) for b in bins]


def _balanced_bins(lengths: list[int], k: int, max_length: int) -> list[list[int]] | None:
    """k bins by longest-processing-time (each sample to the least-filled bin); None if one overflows."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = [[] for _ in range(k)]
    fill = [0] * k
    for i in order:
        b = min(range(k), key=lambda j: (fill[j], j))
        if fill[b] + lengths[i] > max_length:
            return None
        bins[b].append(i)
        fill[b] += lengths[i]
    return [sorted(b) for b in bins if b]


def plan_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Rows for a padded [rows, longest row] batch: the fewest token slots (rows x longest row).

    First-fit decreasing gives the fewest rows, but its last row is often
    short and every row is padded to the longest; spreading the same samples
    evenly over as many (or one more) rows usually wastes less. Deterministic.
    """
    best = plan_packs(lengths, max_length)

    def slots(bins):
        return len(bins) * max(sum(lengths[i] for i in b) for b in bins)

    for k in (len(best), len(best) + 1):
        if k > len(lengths):
            break
        cand = _balanced_bins(lengths, k, max_length)
        if cand is not None and slots(cand) < slots(best):
            best = cand
    return best


def pack_batch(samples: list[dict], pad_id: int, max_length: int, pad_to_multiple_of: int | None = None) -> dict:
    """Pack samples ({"input_ids", "labels"} lists) into rows of at most max_length tokens.

    Returns int64 tensors:
      input_ids, labels, position_ids: [rows, L], L the longest row (rounded up
        to pad_to_multiple_of); labels -100 on padding and on every sample's first token;
      sample_index: [rows, L], which sample (index into `samples`) each token is, -1 on padding;
      num_tokens: 0-dim, the real (non-padding) tokens.
    There is no attention_mask on purpose: see the module docstring.
    """
    if not samples:
        raise ValueError("pack_batch needs at least one sample")
    lengths = [len(s["input_ids"]) for s in samples]
    if min(lengths) == 0:
        raise ValueError("pack_batch: empty sample")
    bins = plan_rows(lengths, max_length)
    length = max(sum(lengths[i] for i in b) for b in bins)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    rows = len(bins)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.empty((rows, length), dtype=torch.long)
    sample_index = torch.full((rows, length), -1, dtype=torch.long)
    for r, b in enumerate(bins):
        pos = 0
        for i in b:
            n = lengths[i]
            input_ids[r, pos:pos + n] = torch.as_tensor(samples[i]["input_ids"], dtype=torch.long)
            labels[r, pos:pos + n] = torch.as_tensor(samples[i]["labels"], dtype=torch.long)
            labels[r, pos] = IGNORE_INDEX  # would be predicted from the previous sample
            position_ids[r, pos:pos + n] = torch.arange(n)
            sample_index[r, pos:pos + n] = i
            pos += n
        position_ids[r, pos:] = torch.arange(length - pos)  # the padding is a separate "sample"
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sample_index": sample_index,
            "num_tokens": torch.tensor(sum(lengths), dtype=torch.long)}


def collate_packed(batch: list[dict], pad_id: int, max_length: int, pad_to_multiple_of: int | None = None) -> dict:
    """Trainer collate for packed micro-batches: what the model takes (no attention_mask) plus num_tokens."""
    out = pack_batch(batch, pad_id, max_length, pad_to_multiple_of)
    out.pop("sample_index")
    return out


def per_sample_sums(token_values: torch.Tensor, sample_index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Sum token_values [rows, L] per sample (sample_index -1 is dropped): [num_samples]."""
    keep = sample_index >= 0
    out = torch.zeros(num_samples, dtype=token_values.dtype, device=token_values.device)
    return out.index_add_(0, sample_index[keep], token_values[keep])


def supports_packing(model) -> bool:
    """Whether the model's attention honours packed position_ids (see the module docstring)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return impl in PACKING_ATTENTION


def length_grouped_chunks(indices: list[int], lengths, num_chunks: int, chunk_size: int) -> list[list[int]]:
    """Cut a global batch into num_chunks micro-batches of chunk_size, grouping similar lengths.

    The fallback when packing is not available: the samples of one step are
    the same, only their assignment to micro-batches changes, so padding to the
    longest sample of each micro-batch wastes little. Deterministic.
    """
    if len(indices) != num_chunks * chunk_size:
        raise ValueError(f"{len(indices)} indices do not make {num_chunks} chunks of {chunk_size}")
    ordered = sorted(indices, key=lambda i: (-int(lengths[i]), i))
    return [ordered[j * chunk_size:(j + 1) * chunk_size] for j in range(num_chunks)]


def padding_stats(lengths: list[int], micro_batches: list[list[int]], max_length: int | None = None,
                  packed: bool = False) -> dict:
    """Token slots computed vs real tokens for a list of micro-batches (padded to longest, or packed)."""
    slots = real = 0
    for mb in micro_batches:
        ls = [lengths[i] for i in mb]
        real += sum(ls)
        if packed:
            bins = plan_rows(ls, max_length)
            slots += len(bins) * max(sum(ls[i] for i in b) for b in bins)
        else:
            slots += len(ls) * max(ls)
    return {"real_tokens": real, "token_slots": slots, "padding_fraction": 1 - real / slots if slots else 0.0}
