"""The whole pipeline on tiny random Qwen3 and Llama models (stage 1 -> TAIA merge -> stage 2 -> final ->
PEFT export reloaded by PEFT alone); Qwen2 is what every other pipeline test runs."""

import subprocess
import sys

import pytest
import torch

from helpers import REPO, base_env, check, run_train

pytestmark = pytest.mark.slow


def tiny_family_model(arch: str, tokenizer, out):
    import transformers

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[arch](**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_pipeline_and_peft_export_on_other_families(arch, tiny_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["base"])
    base = tiny_family_model(arch, tok, tmp_path / f"tiny-{arch}")
    out = tmp_path / "run"
    proc = run_train({**tiny_assets, "base": base}, out, **{
        "stage1.max_steps": 3, "stage2.max_steps": 2, "evaluation.report_models": "[final]",
        "evaluation.general_retention": "false", "adapters.attn_targets": "all", "adapters.mlp_targets": "all"})
    check(proc, f"the {arch} pipeline")
    assert "adapter targets: attention LoRA on 8 layers: q_proj x2, k_proj x2, v_proj x2, o_proj x2; " \
           "mixture-of-LoRA on 6 layers: gate_proj x2, up_proj x2, down_proj x2" in proc.stderr
    export = subprocess.run([sys.executable, "-m", "medcare_dist.export", "peft", "--run", str(out)],
                            env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    check(export, "the PEFT export")
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert final.config.model_type == arch
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "merged_base"),
                                           out / "export" / "peft").eval()
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = final(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # Stage 2 changed the model: the check above compares two trained models, not two copies of the base.
    with torch.no_grad():
        start = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert (a - start).abs().max() > 1e-3
