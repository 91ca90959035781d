"""Validation during training (issue 14): the loss on held-out rows, best-checkpoint choice, early stopping,
all surviving a resume. Single process on the tiny assets."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import check, run_train


def run(assets, out, env=None, **overrides):
    return run_train(assets, out, env, stage=1, **overrides)


def record(out: Path) -> dict:
    return json.loads((out / "stage1" / "result.json").read_text())


def test_the_validation_loss_is_the_mean_token_loss_of_the_trained_adapters(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcare_dist.method.adapter_io import load_adapters
    from medcare_dist.data.conversations import load_stage_dataset

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(Path(tiny_assets["stage2"]).read_text().splitlines(keepends=True)[:23]))
    out = tmp_path / "run"
    proc = run(tiny_assets, out, **{"data.stage1_eval": f"[{eval_file}]", "stage1.eval_every": 5,
                                    "stage1.max_steps": 5})
    check(proc, "stage 1 with validation")
    rec = record(out)
    assert [s for s, _ in rec["result"]["val_losses"]] == [5]
    logged = rec["result"]["val_losses"][-1][1]
    assert rec["summary"]["val_loss_last"] == logged and f"val_loss {logged:.4f}" in proc.stderr

    # Reference: plain PyTorch, the saved adapters on a fresh base, unpacked rows, float64 sums.
    tok = AutoTokenizer.from_pretrained(tiny_assets["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["base"], dtype=torch.float32).eval()
    load_adapters(model, out / "stage1" / "adapters")
    rows, _ = load_stage_dataset([{"path": str(eval_file)}], tok, 96)
    total, count, right = 0.0, 0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            target = labels[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
            right += int(((logits.argmax(-1) == target) & (target != -100)).sum())
    assert logged == pytest.approx(total / count, rel=1e-5)
    # Token accuracy: the share of labelled tokens whose argmax is the label (0 < it < 1 on this model).
    accuracy = rec["result"]["val_accuracies"][-1][1]
    assert 0 < right < count and accuracy == pytest.approx(right / count, abs=0.5 / count)
    assert rec["summary"]["val_token_accuracy_last"] == accuracy and f"token_accuracy {accuracy:.4f}" in proc.stderr


LOUD = {"data.val_size": 0.1, "stage1.eval_every": 2, "stage1.max_steps": 30, "stage1.save_best": True,
        "stage1.early_stopping_patience": 2, "stage1.lr": 3, "stage1.lr_scheduler": "constant",
        "stage1.warmup_ratio": 0, "stage1.save_every": 10}   # lr 3: the validation loss turns up after step 16


def test_save_best_and_early_stopping_survive_a_crash(tiny_assets, tmp_path):
    whole = tmp_path / "whole"
    check(run(tiny_assets, whole, **LOUD), "uninterrupted")
    rec = record(whole)
    vals = rec["result"]["val_losses"]
    best_step, best = min(vals, key=lambda sv: sv[1])
    assert rec["result"]["best_step"] == best_step and rec["result"]["best_val_loss"] == best
    stop = rec["result"]["stopped_early_at"]
    assert stop is not None and stop < 30 and rec["result"]["steps"] == stop
    assert [s for s, _ in vals][-3:] == [best_step, best_step + 2, best_step + 4] and stop == best_step + 4
    kept = load_file(str(whole / "stage1" / "adapters" / "adapters.safetensors"))
    saved_best = load_file(str(whole / "stage1" / "best_adapters" / "adapters.safetensors"))
    assert kept.keys() == saved_best.keys() and all(torch.equal(kept[k], saved_best[k]) for k in kept)

    # Killed after the best step (its adapters already saved), resumed from the checkpoint before it.
    cut = tmp_path / "cut"
    proc = run(tiny_assets, cut, {"MEDCARE_FAIL_AT": f"stage1:{best_step + 2}"}, **LOUD)
    assert proc.returncode == -9, proc.stderr[-3000:]
    check(run(tiny_assets, cut, **LOUD), "the resumed run")
    again = record(cut)
    assert again["summary"]["resumed_from"].endswith("step-0000010")
    for key in ("best_step", "stopped_early_at", "steps"):
        assert again["result"][key] == rec["result"][key], key
    assert again["result"]["best_val_loss"] == pytest.approx(best, rel=1e-6)
    assert [s for s, _ in again["result"]["val_losses"]] == [s for s, _ in vals]
    assert [v for _, v in again["result"]["val_losses"]] == pytest.approx([v for _, v in vals], rel=1e-6)
    got = load_file(str(cut / "stage1" / "adapters" / "adapters.safetensors"))
    assert max(float((kept[k] - got[k]).abs().max()) for k in kept) < 1e-6
    report = (cut / "report.md").read_text()
    assert f"@ {best_step}, stopped early at {stop}" in report
    files = again["summary"]["data"]["files"]  # the data table: what each source gave the stage
    assert files and all(f"| stage1 | `{name}` | {c['read']} | {c['bad']} | 1 | {c['used']} | {c['rows']} |"
                         in report for name, c in files.items())
