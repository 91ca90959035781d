"""Checkpoint bookkeeping and the job's refusals before any compute (single process, fast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medcare_dist.training import checkpoint as ckpt
from medcare_dist.training.integrity import write_manifest

REPO = Path(__file__).resolve().parents[1]


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"step-{step:07d}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / ckpt.STATE_NAME).write_text(json.dumps({"step": step}))
        write_manifest(path)
    return path


def test_latest_ignores_incomplete_and_temporary_checkpoints(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)       # killed before its state was written
    (tmp_path / ".tmp-step-0000008").mkdir()            # killed before the rename
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000004"
    (tmp_path / ckpt.LATEST).write_text("step-0000002")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000002"
    (tmp_path / ckpt.LATEST).write_text("step-0000006")  # points at an incomplete one: fall back
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000004"


def test_prune_keeps_last_n_and_never_the_only_complete_one(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    (tmp_path / ckpt.LATEST).write_text("step-0000008")
    (tmp_path / ".tmp-step-0000010").mkdir()
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-0000006", "step-0000008"]
    assert not (tmp_path / ".tmp-step-0000010").exists()
    ckpt.prune(tmp_path, keep_last=0)  # 0 still keeps the latest complete checkpoint
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-0000008"]


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


def test_unknown_recipe_key_stops_with_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 1\nstage1:\n  lrr: 0.1\n")
    proc = run_cli("--recipe", str(recipe))
    assert proc.returncode == 2
    assert f"{recipe}, line 3" in proc.stderr and "stage1.lr" in proc.stderr


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny demo-tokenizer Qwen2 directory (random weights) and a stage-1 output built on a different one."""
    from transformers import Qwen2ForCausalLM

    from medcare_dist.demo.assets import demo_model_config, prepare_demo

    root = tmp_path_factory.mktemp("bases")
    tok = prepare_demo(root / "demo").tokenizer()
    for name, hidden in (("base", 32), ("other", 48)):
        cfg = demo_model_config(tok, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=4)
        Qwen2ForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    stage1_out = root / "stage1_run"
    (stage1_out / "merged_base").mkdir(parents=True)
    for f in (root / "other").iterdir():
        (stage1_out / "merged_base" / f.name).write_bytes(f.read_bytes())
    (stage1_out / "merged_base" / "knowledge_adapters").mkdir()
    (stage1_out / "merged_base" / "knowledge_adapters" / "adapter_config.json").write_text(json.dumps(
        {"format": "medcare-dist-adapters", "version": 1, "base_model": {}, "modules": {}}))
    return root


def test_stage2_on_another_base_is_refused_before_compute(tiny_base, tmp_path):
    proc = run_cli("--recipe", str(REPO / "launch/recipes/demo.yaml"), "stage=2",
                   f"init_from={tiny_base / 'stage1_run'}", f"model.path={tiny_base / 'base'}",
                   f"output_dir={tmp_path / 'out'}", "data.stage2=[/nonexistent.jsonl]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trained on another base model" in proc.stderr and "hidden_size: 48" in proc.stderr


def test_missing_data_file_is_named(tiny_base, tmp_path):
    proc = run_cli("--recipe", str(REPO / "launch/recipes/demo.yaml"), "stage=1",
                   f"model.path={tiny_base / 'base'}", f"output_dir={tmp_path / 'out'}",
                   "data.stage1=[/nonexistent/train.jsonl]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "/nonexistent/train.jsonl" in proc.stderr


def test_adapters_that_do_not_fit_the_model_are_refused_before_compute(tiny_base, tmp_path):
    # hidden 32, intermediate 64: gate/up_proj take 32 inputs, down_proj 64. With a 16-dim knowledge
    # subspace the alignment rank may be 16 on gate/up and 48 on down_proj; 20 fits down_proj only.
    proc = run_cli("--recipe", str(REPO / "launch/recipes/demo.yaml"), f"model.path={tiny_base / 'base'}",
                   f"output_dir={tmp_path / 'out'}", "adapters.shared_rank=16", "adapters.align_rank=20",
                   "adapters.mlp_targets=[gate_proj,up_proj,down_proj,gate_prj]", "adapters.attn_rank=40")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "adapters.mlp_targets[3]='gate_prj': selects no nn.Linear of this model" in err
    assert "alignment LoRA of gate_proj" in err and "alignment LoRA of up_proj" in err
    assert "alignment LoRA of down_proj" not in err
    assert "leaves room for rank 16 at most" in err
    assert "adapters.attn_rank=40 exceeds min(in, out) = 32" in err   # a warning, next to the errors
    assert not (tmp_path / "out" / "stage1" / "tokenized").exists()     # nothing was computed
