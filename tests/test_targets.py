"""Adapter targets: short names, `all` and regular expressions, resolved on Qwen2, Qwen3 and Llama layouts;
the planner counts what the model gets."""

import pytest
import torch

from medcare_dist.method.injection import add_stage1_adapters, adapter_layers, check_adapter_fit, resolved_targets
from test_adapters import adapter_cfg

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def tiny(arch: str):
    import transformers

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    config = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
              "llama": transformers.LlamaConfig}[arch](**common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def names(selected):
    return [n for n, _ in selected]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_all_and_short_names_select_each_blocks_linears(arch):
    model = tiny(arch)
    want_attn = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ATTN]
    want_mlp = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in MLP]
    got = resolved_targets(model, adapter_cfg(attn_targets=["all"], mlp_targets=["all"]))
    assert names(got["attn_targets"]) == want_attn and names(got["mlp_targets"]) == want_mlp  # model order
    # Short names: target by target (q_proj of every layer, then k_proj, ...), the order adapters were always
    # created in, so that their seeded initialisation does not change.
    got = resolved_targets(model, adapter_cfg(attn_targets=list(ATTN), mlp_targets=list(MLP)))
    assert names(got["attn_targets"]) == [f"model.layers.{i}.self_attn.{p}" for p in ATTN for i in range(2)]
    assert sorted(names(got["mlp_targets"])) == sorted(want_mlp)
    assert "lm_head" not in names(resolved_targets(model, adapter_cfg(attn_targets=[r".*"], mlp_targets=[]))
                                  ["attn_targets"])


def test_regular_expressions_match_the_full_name_as_peft_does():
    model = tiny("qwen2")
    cfg = adapter_cfg(attn_targets=[r"model\.layers\.1\.self_attn\.(q|v)_proj"], mlp_targets=["down_proj"])
    got = resolved_targets(model, cfg)
    assert names(got["attn_targets"]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    # A full match: "q_proj" as a pattern fragment selects nothing; it is a short name, not a search.
    cfg = adapter_cfg(attn_targets=[r"self_attn\.q_proj"], mlp_targets=["down_proj"])
    problems, _ = check_adapter_fit(model, cfg)
    assert problems == [r"adapters.attn_targets[0]='self_attn\\.q_proj': selects no nn.Linear of this model (its "
                        "linear layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj; a target is "
                        "a short name, `all`, or a regular expression on the full name)"]
    add_stage1_adapters(model, adapter_cfg(attn_targets=[r"model\.layers\.1\.self_attn\.(q|v)_proj"],
                                           mlp_targets=["down_proj"]))
    assert len(adapter_layers(model)) == 2 + 2


def test_bad_patterns_and_overlaps_are_problems_not_crashes():
    model = tiny("qwen2")
    problems, _ = check_adapter_fit(model, adapter_cfg(attn_targets=["(q_proj"], mlp_targets=["all"]))
    assert problems[0].startswith("adapters.attn_targets[0]='(q_proj': not a valid regular expression")
    problems, _ = check_adapter_fit(model, adapter_cfg(attn_targets=[r".*\.mlp\.up_proj"], mlp_targets=["all"]))
    assert problems == ["adapters.attn_targets and adapters.mlp_targets both select model.layers.0.mlp.up_proj "
                        "(and 1 more): a layer takes one adapter"]
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        add_stage1_adapters(model, adapter_cfg(attn_targets=["qkv_proj"]))


def test_recipe_targets_are_checked_where_they_are_written(tmp_path):
    from medcare_dist.config import ConfigError, load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapters:\n  attn_targets: all\n  mlp_targets: all\n")
    cfg = load_config(str(recipe))
    assert cfg.adapters.attn_targets == ["all"] and cfg.adapters.mlp_targets == ["all"]
    recipe.write_text("adapters:\n  attn_targets:\n    - '.*(q_proj'\n")
    with pytest.raises(ConfigError, match=r"r.yaml, line 2: adapters.attn_targets\[0\]: '.\*\(q_proj' is not a "
                                          r"valid regular expression"):
        load_config(str(recipe))


@pytest.mark.parametrize("targets", [(["all"], ["all"]), ([r"model\.layers\.0\.self_attn\.[qk]_proj"], ["up_proj"])])
def test_the_planner_counts_the_adapters_the_model_gets(targets):
    from medcare_dist.cluster.model_shape import ModelShape, build_model, unique_params

    cfg = adapter_cfg(attn_targets=targets[0], mlp_targets=targets[1])
    model = tiny("qwen2")
    add_stage1_adapters(model, cfg)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = ModelShape("tiny", 32, 48, 2, 4, 2, 64)
    root, _ = build_model(shape, cfg, 1)
    planned = sum(p.numel for p in unique_params(root) if p.trainable)
    assert planned == real
