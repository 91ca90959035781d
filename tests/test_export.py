"""Exports reloaded by transformers / PEFT alone give the in-project model's logits."""

import json
import os

import pytest
import torch

from medcare_dist.method.adapter_io import save_adapters
from medcare_dist.method.adapters import OrthogonalLoRALinear
from medcare_dist.export import ExportError, export_hf, export_peft, export_peft_from_model, main
from medcare_dist.method.injection import (add_stage1_adapters, add_stage2_adapters, adapter_layers, merge_attention_lora,
                                    remove_adapters, replace_module)
from test_adapters import adapter_cfg, randomise_B, tiny_qwen2

ATOL = 1e-4


def tiny_tokenizer():
    """A word-level tokenizer with Qwen's ChatML tokens and a chat template (no training, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from medcare_dist.demo.assets import CHATML_TEMPLATE

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "user", "assistant", "the", "answer", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                      unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def stage2_model(seed=0, mixed_ranks=False):
    """A tiny Qwen2 through stage 1 -> TAIA merge -> stage 2, every adapter path non-zero.

    align_A is set to raw random values, so in hard mode the effective (projected) A differs from the
    stored parameter and an export that skipped effective_align_A() would not match.
    """
    model = tiny_qwen2(seed)
    add_stage1_adapters(model, adapter_cfg())
    randomise_B(model)
    merge_attention_lora(model)
    add_stage2_adapters(model, adapter_cfg())
    randomise_B(model)
    with torch.no_grad():
        for _, layer in adapter_layers(model, OrthogonalLoRALinear):
            layer.align_A.normal_(0, 0.3)
    if mixed_ranks:  # one projection with another alignment rank and scaling: rank_pattern / alpha_pattern
        name = "model.layers.1.mlp.up_proj"
        old = model.get_submodule(name)
        new = OrthogonalLoRALinear(old.base, old.knowledge_A, old.knowledge_B, rank=6, alpha=3.0)
        randomise_B(new)
        replace_module(model, name, new)
    return model.eval()


def save_run(model, tmp_path):
    """merged_base/ (attention-merged backbone, plain MLPs, tokenizer) and stage2/adapters/, as the pipeline."""
    save_adapters(model, tmp_path / "stage2" / "adapters", extra={"stage": "stage2"})
    plain = remove_adapters(_clone(model))
    plain.save_pretrained(tmp_path / "merged_base")
    tiny_tokenizer().save_pretrained(tmp_path / "merged_base")
    return tmp_path / "merged_base", tmp_path / "stage2" / "adapters"


def _clone(model):
    import copy

    return copy.deepcopy(model)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mixed_ranks", [False, True])
def test_hf_and_peft_exports_match_logits(tmp_path, ids, mixed_ranks):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = stage2_model(mixed_ranks=mixed_ranks)
    with torch.no_grad():
        ours = model(ids).logits
    base_dir, adapters_dir = save_run(model, tmp_path)

    hf_dir = export_hf(base_dir, adapters_dir, tmp_path / "hf")
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert not any("lora" in n or "align" in n for n, _ in hf.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, atol=ATOL, rtol=0)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False,
                                                              add_generation_prompt=True)
    assert tok.convert_tokens_to_ids("<|im_end|>") in hf.generation_config.eos_token_id

    peft_dir = export_peft(base_dir, adapters_dir, tmp_path / "peft")
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 12  # knowledge rank 8 + alignment rank 4
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, atol=ATOL, rtol=0)
    # The file's keys and shapes are exactly what PEFT itself saves for this model.
    saved = load_file(peft_dir / "adapter_model.safetensors")
    native = get_peft_model_state_dict(peft_model)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in native.items()}
    up = peft_model.base_model.model.model.layers[1].mlp.up_proj
    layer = model.get_submodule("model.layers.1.mlp.up_proj")
    assert up.r["default"] == layer.knowledge_rank + layer.rank
    assert up.scaling["default"] == pytest.approx(layer.scaling)
    if mixed_ranks:
        assert cfg["rank_pattern"] == {"model.layers.1.mlp.up_proj": 14}
        assert set(cfg["alpha_pattern"]) == {"model.layers.1.mlp.up_proj"}

    # The in-memory path writes the same tensors.
    export_peft_from_model(model, tmp_path / "peft2", str(base_dir))
    again = load_file(tmp_path / "peft2" / "adapter_model.safetensors")
    assert again.keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(again[k], saved[k])


def test_export_refuses_routed_mixture(tmp_path):
    model = add_stage1_adapters(tiny_qwen2(), adapter_cfg())
    save_adapters(model, tmp_path / "stage1")
    plain = remove_adapters(_clone(model))
    plain.save_pretrained(tmp_path / "base")
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.gate_proj: MixtureOfLoRALinear"):
        export_peft(tmp_path / "base", tmp_path / "stage1", tmp_path / "out")
    with pytest.raises(ExportError, match="MixtureOfLoRALinear"):
        export_peft_from_model(model, tmp_path / "out")
    with pytest.raises(ExportError, match="MixtureOfLoRALinear"):
        export_hf(tmp_path / "base", tmp_path / "stage1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_on_a_run_directory(tmp_path, ids, capsys):
    from transformers import AutoModelForCausalLM

    model = stage2_model(seed=3)
    with torch.no_grad():
        ours = model(ids).logits
    save_run(model, tmp_path)
    main(["hf", "--run", str(tmp_path)])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, atol=ATOL, rtol=0)
    main(["peft", "--run", str(tmp_path), "--out", str(tmp_path / "p")])
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for path in [*(tmp_path / "export" / "hf").iterdir(), *(tmp_path / "p").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))
    with pytest.raises(SystemExit):
        main(["peft", "--run", str(tmp_path / "nothing")])
    assert "no merged_base" in capsys.readouterr().err


def test_export_rejects_another_base(tmp_path):
    model = stage2_model()
    _, adapters_dir = save_run(model, tmp_path)
    tiny_qwen2(vocab=128).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocab_size"):
        export_peft(tmp_path / "other", adapters_dir, tmp_path / "out")
