"""medcare_dist.training.zero.stop_backward_at_embedding, in plain torch: the backward stops at the embedding's
output (so a ZeRO-3 pre-backward hook on the frozen embedding never fires and never gathers it), while the
adapters' gradients stay those of the model without it, with and without reentrant checkpointing."""

import pytest
import torch
import transformers

from medcare_dist.config import AdapterConfig
from medcare_dist.method.injection import add_stage1_adapters
from medcare_dist.training.modeling import enable_gradient_checkpointing
from medcare_dist.training.zero import stop_backward_at_embedding


def _model():
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).double()
    model.config.use_cache = False
    add_stage1_adapters(model, AdapterConfig(attn_rank=4, expert_rank=2, num_experts=4, top_k=2, shared_rank=4,
                                             attn_dropout=0.0, expert_dropout=0.0))
    for name, p in model.named_parameters():  # B = 0 at init would leave A's gradients zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model.double().train()


def _count_embedding_backward(model) -> list:
    """A stand-in for ZeRO-3's pre-backward hook on the embedding (registered first, as deepspeed.initialize
    registers its own): counts how often the backward reaches the embedding's output."""
    calls = []

    class Counting(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            calls.append(1)
            return g

    model.get_input_embeddings().register_forward_hook(lambda m, i, out: Counting.apply(out))
    return calls


def _adapter_grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_stops_at_the_embedding_and_adapter_grads_are_unchanged(checkpointing):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = _model()  # no checkpointing, the embedding output marked the HF way
    reference.enable_input_require_grads()
    reached = _count_embedding_backward(reference)
    want = _adapter_grads(reference, ids)
    assert len(reached) == 1  # HF's way runs the backward into the embedding module

    model = _model()  # the same seeded weights
    if checkpointing:
        enable_gradient_checkpointing(model)
    reached = _count_embedding_backward(model)
    stop_backward_at_embedding(model)
    got = _adapter_grads(model, ids)
    assert reached == []
    assert want.keys() == got.keys() and len(got) > 0
    for name in want:
        assert got[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)

