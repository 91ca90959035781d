"""Recipes, overrides, error messages (file, line, field, suggestion) and the DeepSpeed configs."""

import json
import os
import textwrap

import pytest

from medcare_dist.config import REPO_ROOT, ConfigError, RunConfig, StageConfig, load_config, resolve_dtype
from medcare_dist.training.ds_config import build_ds_config

RECIPES = REPO_ROOT / "launch" / "recipes"
DEMO = str(RECIPES / "demo.yaml")
DS_CONFIGS = ["ds_configs/zero3.json", "ds_configs/zero3_cpu.json", "ds_configs/zero3_offload.json",
              "ds_configs/zero2.json"]


def write(tmp_path, text, name="r.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def error_of(recipe, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(recipe, overrides)
    return str(e.value)


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["demo", "qwen1.5-1.8b", "qwen1.5-7b", "qwen1.5-14b", "small-chat", "qwen2.5-7b",
                                  "qwen3-8b", "llama-3.1-8b"])
def test_recipes_load(name):
    cfg = load_config(str(RECIPES / f"{name}.yaml"))
    assert isinstance(cfg, RunConfig)
    assert cfg.stage == "all"
    assert cfg.stage1.epochs == {"demo": 16, "small-chat": 2}.get(name, 1)
    assert cfg.adapters.noise_drop_prob == 0.5
    assert cfg.to_dict()["adapters"]["top_k"] == cfg.adapters.top_k
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # to_dict round-trips


@pytest.mark.parametrize("name", ["qwen2.5-7b", "qwen3-8b", "llama-3.1-8b"])
def test_family_recipes_are_the_paper_recipe_on_another_model(name):
    from medcare_dist.cluster.model_shape import PRESETS

    cfg, paper = load_config(str(RECIPES / f"{name}.yaml")), load_config(str(RECIPES / "qwen1.5-7b.yaml"))
    mine, ref = cfg.to_dict(), paper.to_dict()
    for d in (mine, ref):
        d.pop("output_dir"), d["model"].pop("path")
    assert mine == ref and cfg.output_dir == f"runs/medcare-{name}"
    assert name in PRESETS and f"--model {name}" in (RECIPES / f"{name}.yaml").read_text()


@pytest.mark.parametrize("size", ["1.8B", "7B", "14B"])
def test_qwen_recipes_carry_paper_hyperparameters(size):
    cfg = load_config(str(RECIPES / f"qwen1.5-{size.lower()}.yaml"))
    assert cfg.model.path == f"/models/Qwen1.5-{size}-Chat"
    assert (cfg.model.dtype, cfg.model.gradient_checkpointing) == ("bf16", True)
    assert cfg.data.max_length == 3072
    for s, epochs in ((cfg.stage1, 1), (cfg.stage2, 3)):
        assert (s.epochs, s.lr, s.lr_scheduler, s.warmup_ratio, s.weight_decay) == (epochs, 2e-4, "cosine", 0.03, 0)
        assert (s.micro_batch_size, s.global_batch_size, s.max_steps) == (4, 128, -1)
    a = cfg.adapters
    assert (a.attn_rank, a.attn_alpha, a.attn_dropout) == (16, 32, 0.05)
    assert (a.expert_rank, a.num_experts, a.top_k, a.shared_rank, a.align_rank) == (16, 8, 2, 32, 32)
    assert a.orthogonality_lambda == 1.0
    assert cfg.deepspeed.config == "ds_configs/zero3.json"
    ds = build_ds_config(cfg, cfg.stage1, 4, "bf16")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 8)


def test_defaults_are_the_papers(tmp_path):
    cfg = load_config(write(tmp_path, "{}\n"))
    assert cfg.seed == 42 and cfg.resume is True and cfg.model.path is None
    assert (cfg.stage1.epochs, cfg.stage2.epochs) == (1, 3)
    assert cfg.adapters.orthogonality == "hard"
    # A partial stage2 section keeps stage2's own defaults (epochs=3), not StageConfig()'s.
    cfg = load_config(write(tmp_path, "stage2:\n  lr: 1.0e-5\n"))
    assert (cfg.stage2.epochs, cfg.stage2.lr) == (3, 1e-5)


# --------------------------------------------------------------------------- overrides


def test_overrides_parse_types_and_nest():
    cfg = load_config(DEMO, [
        "stage1.lr=1e-4",                          # exponent without a dot is a float, not a string
        "stage1.max_steps=7",
        "adapters.orthogonality=soft",
        "adapters.attn_targets=[q_proj, v_proj]",
        "model.gradient_checkpointing=true",
        "model.tiny.hidden_size=64",
        "output_dir=2024",                          # str field keeps the text as written
        "stage=2", "init_from=runs/s1",
        "data.stage2=[/d/a.jsonl, {path: /d/b.json, format: alpaca, max_samples: 10}]",
        "model.dtype=bfloat16",
        "stage2.warmup_ratio=0",
    ])
    assert cfg.stage1.lr == 1e-4 and isinstance(cfg.stage1.lr, float)
    assert cfg.stage1.max_steps == 7
    assert cfg.adapters.orthogonality == "soft"
    assert cfg.adapters.attn_targets == ["q_proj", "v_proj"]
    assert cfg.model.gradient_checkpointing is True
    assert cfg.model.tiny.hidden_size == 64 and cfg.model.tiny.num_hidden_layers == 4  # the rest of tiny kept
    assert cfg.output_dir == "2024"
    assert cfg.stage == 2 and cfg.init_from == "runs/s1"
    assert [(s.path, s.format, s.max_samples) for s in cfg.data.stage2] == [
        ("/d/a.jsonl", "auto", None), ("/d/b.json", "alpaca", 10)]
    assert cfg.model.dtype == "bf16"
    assert cfg.stage2.warmup_ratio == 0.0


def test_override_later_wins_and_mapping_merges():
    cfg = load_config(DEMO, ["stage1.lr=1e-3", "stage1.lr=3e-3", "model.tiny={num_hidden_layers: 3}",
                             "stage='1'", "model.path=null"])
    assert cfg.stage1.lr == 3e-3
    assert cfg.model.tiny.num_hidden_layers == 3 and cfg.model.tiny.hidden_size == 128
    assert cfg.stage == 1 and cfg.model.path is None


def test_stage_values():
    assert load_config(DEMO, ["stage=1"]).stage == 1
    assert load_config(DEMO, ["stage=ALL"]).stage == "all"
    assert "stage" in error_of(DEMO, ["stage=3"])


def test_malformed_override():
    msg = error_of(DEMO, ["stage1.lr"])
    assert "override 'stage1.lr'" in msg and "key=value" in msg


# --------------------------------------------------------------------------- errors: where and what


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, """
        seed: 1
        stage1:
          epochs: 1
          learning_rate: 1.0e-4
        """)
    msg = error_of(path)
    assert path in msg and "line 4" in msg
    assert "stage1.learning_rate" in msg and "unknown key" in msg
    assert "did you mean 'stage1.lr'?" in msg  # an HF TrainingArguments name maps to ours


def test_unknown_key_typo_suggests_closest(tmp_path):
    path = write(tmp_path, """
        adapters:
          attn_rank: 8

          num_expert: 4
        """)
    msg = error_of(path)
    assert f"{path}, line 4: adapters.num_expert: unknown key; did you mean 'adapters.num_experts'?" in msg


def test_misplaced_key_points_to_its_section(tmp_path):
    msg = error_of(write(tmp_path, "stage1:\n  top_k: 2\n"))
    assert "line 2" in msg and "did you mean 'adapters.top_k'" in msg


def test_unknown_key_in_override_names_override():
    msg = error_of(DEMO, ["stage1.lrr=1e-4"])
    assert "override 'stage1.lrr=1e-4'" in msg and "did you mean 'stage1.lr'" in msg


def test_wrong_type_names_line_and_field(tmp_path):
    path = write(tmp_path, """
        model:
          gradient_checkpointing: "yes please"
        """)
    msg = error_of(path)
    assert f"{path}, line 2: model.gradient_checkpointing: expected true or false" in msg
    msg = error_of(DEMO, ["stage1.micro_batch_size=2.5"])
    assert "stage1.micro_batch_size" in msg and "integer" in msg
    assert "expected a list" in error_of(DEMO, ["adapters.mlp_targets=3"])


def test_duplicate_key_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, "seed: 1\nseed: 2\n"))
    assert "line 2" in msg and "line 1" in msg


def test_invalid_yaml_names_file(tmp_path):
    path = write(tmp_path, "stage1: [\n")
    assert path in error_of(path)


def test_missing_recipe():
    assert "nope.yaml" in error_of("nope.yaml")


@pytest.mark.parametrize("override, field, words", [
    ("adapters.attn_rank=0", "adapters.attn_rank", "> 0"),
    ("adapters.expert_rank=-4", "adapters.expert_rank", "> 0"),
    ("adapters.shared_rank=0", "adapters.shared_rank", "> 0"),
    ("adapters.align_rank=0", "adapters.align_rank", "> 0"),
    ("adapters.top_k=5", "adapters.top_k", "num_experts"),
    ("adapters.top_k=0", "adapters.top_k", "between 1"),
    ("adapters.num_experts=0", "adapters.num_experts", "> 0"),
    ("adapters.attn_dropout=1.0", "adapters.attn_dropout", "[0, 1)"),
    ("adapters.expert_dropout=-0.1", "adapters.expert_dropout", "[0, 1)"),
    ("adapters.noise_drop_prob=1.5", "adapters.noise_drop_prob", "[0, 1]"),
    ("data.stage2_replay=-1", "data.stage2_replay", ">= 0"),
    ("adapters.protect_inputs_energy=1.0", "adapters.protect_inputs_energy", "[0, 1)"),
    ("evaluation.report_models=[base,bse]", "evaluation.report_models", "'bse' is not one of"),
    ("adapters.orthogonality=off", "adapters.orthogonality", "not one of"),
    ("adapters.orthogonality=sof", "adapters.orthogonality", "did you mean 'soft'"),
    ("adapters.orthogonality_lambda=-1", "adapters.orthogonality_lambda", ">= 0"),
    ("stage1.lr=0", "stage1.lr", "> 0"),
    ("stage2.lr=-1e-4", "stage2.lr", "> 0"),
    ("stage1.micro_batch_size=0", "stage1.micro_batch_size", "> 0"),
    ("stage1.global_batch_size=0", "stage1.global_batch_size", "> 0"),
    ("stage1.global_batch_size=12", "stage1.global_batch_size", "multiple of micro_batch_size"),
    ("stage1.warmup_ratio=1.0", "stage1.warmup_ratio", "[0, 1)"),
    ("stage2.warmup_ratio=-0.1", "stage2.warmup_ratio", "[0, 1)"),
    ("stage1.epochs=0", "stage1.epochs", "> 0"),
    ("stage1.max_steps=0", "stage1.max_steps", "-1"),
    ("stage1.lr_scheduler=step", "stage1.lr_scheduler", "cosine"),
    ("model.dtype=fp8", "model.dtype", "not one of"),
    ("model.attn_implementation=flash", "model.attn_implementation", "not one of"),
    ("data.on_bad_row=ignore", "data.on_bad_row", "not one of"),
    ("data.stage1=[{format: alpaca}]", "data.stage1[0].path", "required"),
    ("data.stage1=[{path: a.json, format: csv}]", "data.stage1[0].format", "not one of"),
    ("data.max_length=0", "data.max_length", "> 0"),
    ("model.tiny.num_attention_heads=3", "model.tiny.num_attention_heads", "divisible"),
    ("logging.keep_last=0", "logging.keep_last", "> 0"),
    ("stage=2", "stage", "init_from"),
])
def test_impossible_values(override, field, words):
    msg = error_of(DEMO, [override])
    assert f"override '{override}'" in msg
    assert field in msg and words in msg, msg


def test_input_protection_needs_a_projection():
    msg = error_of(DEMO, ["adapters.orthogonality=soft", "adapters.protect_inputs_energy=0.9"])
    assert "adapters.protect_inputs_energy" in msg and "hard or both" in msg
    assert load_config(DEMO, ["adapters.protect_inputs_energy=0.9"]).adapters.protect_inputs_energy == 0.9


def test_impossible_value_in_file_names_line(tmp_path):
    path = write(tmp_path, """
        adapters:
          num_experts: 4
          top_k: 6
        """)
    msg = error_of(path)
    assert f"{path}, line 3: adapters.top_k" in msg


def test_data_files_are_not_checked_here():
    cfg = load_config(DEMO, ["data.stage1=[/does/not/exist.jsonl]"])
    assert cfg.data.stage1[0].path == "/does/not/exist.jsonl"


def test_deepspeed_config_missing_or_invalid(tmp_path):
    msg = error_of(DEMO, ["deepspeed.config=ds_configs/zero9.json"])
    assert "zero9.json" in msg and "deepspeed.config" in msg and "not found" in msg
    bad = tmp_path / "bad.json"
    bad.write_text("{\"zero_optimization\": {\"stage\": 3,}}")
    msg = error_of(DEMO, [f"deepspeed.config={bad}"])
    assert str(bad) in msg and "not valid JSON" in msg


# --------------------------------------------------------------------------- DeepSpeed


def test_build_ds_config_math():
    cfg = load_config(DEMO, ["stage1.micro_batch_size=4", "stage1.global_batch_size=128", "stage1.max_grad_norm=0.5"])
    ds = build_ds_config(cfg, cfg.stage1, 4, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 128
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "_comment" not in ds and "optimizer" not in ds
    ds = build_ds_config(cfg, cfg.stage2, 2, "fp32")  # demo stage2: micro 16, global 32
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 32)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert build_ds_config(cfg, cfg.stage2, 1, "fp16")["fp16"]["enabled"] is True


def test_build_ds_config_divisibility_error():
    cfg = load_config(DEMO, ["stage1.micro_batch_size=4", "stage1.global_batch_size=128"])
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg, cfg.stage1, 3, "fp32")
    msg = str(e.value)
    assert "stage1.global_batch_size=128" in msg and "(4)" in msg and "(3)" in msg and "12" in msg
    assert "120" in msg and "132" in msg  # the nearest valid global batch sizes


def _ds_json(tmp_path, data) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_build_ds_config_refuses_conflicting_batch_keys(tmp_path):
    path = _ds_json(tmp_path, {"zero_optimization": {"stage": 2}, "train_batch_size": 64})
    cfg = load_config(DEMO, [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(cfg, cfg.stage1, 1, "fp32")
    # the same value, or HF-style "auto", is tolerated
    path = _ds_json(tmp_path, {"train_batch_size": 32, "gradient_accumulation_steps": "auto"})
    cfg = load_config(DEMO, [f"deepspeed.config={path}"])
    assert build_ds_config(cfg, cfg.stage1, 1, "fp32")["gradient_accumulation_steps"] == 2
    path = _ds_json(tmp_path, {"optimizer": {"type": "AdamW"}})
    cfg = load_config(DEMO, [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config(cfg, cfg.stage1, 1, "fp32")


@pytest.mark.parametrize("name", ["fa2", "flash_attn", "flash-attn", "FA2", "flash_attention_2"])
def test_flash_attention_is_accepted_by_the_names_users_know(name):
    assert load_config(DEMO, [f"model.attn_implementation={name}"]).model.attn_implementation == "flash_attention_2"


def test_validation_keys_are_checked_together():
    with pytest.raises(ConfigError, match="stage1.eval_every: needs validation data"):
        load_config(DEMO, ["stage1.eval_every=50"])
    with pytest.raises(ConfigError, match=r"stage2.save_best: needs stage2.eval_every > 0"):
        load_config(DEMO, ["stage2.save_best=true"])
    with pytest.raises(ConfigError, match="data.val_size: given, but"):
        load_config(DEMO, ["data.val_size=0.1"])
    with pytest.raises(ConfigError, match="data.stage1_eval: given, but stage1.eval_every is 0"):
        load_config(DEMO, ["data.stage1_eval=[/x.jsonl]"])
    with pytest.raises(ConfigError, match="a share must be below 1"):
        load_config(DEMO, ["data.val_size=2.5", "stage1.eval_every=5"])
    cfg = load_config(DEMO, ["data.val_size=0.1", "stage1.eval_every=5", "stage1.save_best=true",
                             "stage1.early_stopping_patience=2"])
    assert cfg.stage1.save_best and cfg.stage1.early_stopping_patience == 2


def test_a_foreign_config_with_auto_values_gets_the_projects_choices_not_deepspeeds(tmp_path):
    # LLaMA-Factory's ds_z3_config.json: DeepSpeed would read "auto" persistence as its default 1e5 and
    # partition the adapter tensors that ds_configs/zero3.json keeps whole.
    lf = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
          "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"},
          "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
          "zero_optimization": {"stage": 3, "overlap_comm": False, "sub_group_size": 1e9,
                                "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto",
                                "stage3_gather_16bit_weights_on_model_save": True}}
    cfg = load_config(DEMO, [f"deepspeed.config={_ds_json(tmp_path, lf)}"])
    ds = build_ds_config(cfg, cfg.stage1, 2, "bf16")
    ours = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    zero = ds["zero_optimization"]
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert zero[key] == ours[key], key
    assert zero["overlap_comm"] is False and zero["sub_group_size"] == 1e9      # its own values are kept
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(ds)
    lf["zero_optimization"]["offload_param"] = "auto"     # an "auto" the project has no value for
    lf["wall_clock_breakdown"] = "auto"
    cfg = load_config(DEMO, [f"deepspeed.config={_ds_json(tmp_path, lf)}"])
    with pytest.raises(ConfigError, match=r'zero_optimization.offload_param is "auto" and medcare-dist has no value'):
        build_ds_config(cfg, cfg.stage1, 2, "bf16")
    del lf["zero_optimization"]["offload_param"]
    cfg = load_config(DEMO, [f"deepspeed.config={_ds_json(tmp_path, lf)}"])
    with pytest.raises(ConfigError, match=r'wall_clock_breakdown is "auto"'):
        build_ds_config(cfg, cfg.stage1, 2, "bf16")


def test_ds_json_files_leave_batch_sizes_to_the_recipe():
    for rel in DS_CONFIGS:
        data = json.loads((REPO_ROOT / rel).read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "optimizer", "scheduler"):
            assert key not in data, (rel, key)
        assert data["zero_allow_untested_optimizer"] is True
        z = data["zero_optimization"]
        if z["stage"] == 3:
            # every adapter tensor at the paper's ranks persists; no Qwen1.5 backbone matrix does
            assert 8 * 16 * 13696 <= z["stage3_param_persistence_threshold"] < 2048 * 2048


def test_cpu_zero3_is_zero3_without_prefetch():
    """zero3_cpu.json differs from zero3.json in the prefetch bucket only, so the two cannot drift apart."""
    gpu, cpu = (json.loads((REPO_ROOT / "ds_configs" / n).read_text()) for n in ("zero3.json", "zero3_cpu.json"))
    assert gpu["zero_optimization"]["stage3_prefetch_bucket_size"] > 0
    assert cpu["zero_optimization"].pop("stage3_prefetch_bucket_size") == 0
    gpu["zero_optimization"].pop("stage3_prefetch_bucket_size")
    assert {k: v for k, v in cpu.items() if k != "_comment"} == {k: v for k, v in gpu.items() if k != "_comment"}
    assert load_config(DEMO).deepspeed.config == "ds_configs/zero3_cpu.json"


@pytest.mark.parametrize("rel", DS_CONFIGS)
def test_ds_configs_accepted_by_deepspeed(rel, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(DEMO, [f"deepspeed.config={rel}"])
    # Without an initialised process group DeepSpeedConfig assumes world size 1: fill for one rank.
    ds = build_ds_config(cfg, cfg.stage1, 1, "bf16")
    parsed = DeepSpeedConfig(ds)
    assert parsed.train_batch_size == 32  # the demo's stage 1: micro 16 x 2 accumulation steps
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    stage = json.loads((REPO_ROOT / rel).read_text())["zero_optimization"]["stage"]
    assert parsed.zero_optimization_stage == stage
    if stage == 3:
        assert parsed.zero_config.param_persistence_threshold == 2_000_000
    # the raw file (top-level "_comment" included) is tolerated by DeepSpeed as well
    raw = json.loads((REPO_ROOT / rel).read_text())
    raw.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    DeepSpeedConfig(raw)


def test_ds_path_absolute_and_relative():
    cfg = load_config(DEMO, [f"deepspeed.config={REPO_ROOT / 'ds_configs' / 'zero2.json'}"])
    assert build_ds_config(cfg, cfg.stage1, 1, "fp32")["zero_optimization"]["stage"] == 2
    cwd = os.getcwd()
    try:
        os.chdir("/")  # relative paths are read from the repository root, not the working directory
        cfg = load_config(DEMO)
        assert build_ds_config(cfg, cfg.stage1, 1, "fp32")["zero_optimization"]["stage"] == 3
    finally:
        os.chdir(cwd)


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("bf16", "cpu") == "bf16"
    assert resolve_dtype("fp32", "cuda") == "fp32"
    assert resolve_dtype("float16", "cuda:0") == "fp16"
    with pytest.raises(ConfigError):
        resolve_dtype("int8", "cpu")


def test_stage_config_default_is_papers():
    s = StageConfig()
    assert (s.lr, s.lr_scheduler, s.warmup_ratio, s.micro_batch_size, s.global_batch_size) == \
        (2e-4, "cosine", 0.03, 4, 128)
