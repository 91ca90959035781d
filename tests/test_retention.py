"""General-ability retention and the side-by-side pipeline evaluation of the report."""

import json
import math

import pytest
import torch

from medcare_dist import report
from medcare_dist.eval import retention
from medcare_dist.eval.harness import load_model, render_prompt


@pytest.fixture(scope="module")
def base(tiny_assets):
    return load_model(tiny_assets["base"], dtype="fp32", device="cpu")


def test_reference_scores_its_own_model_best_and_moves_with_the_weights(tiny_assets, base, tmp_path):
    model, tok, _ = base
    ref = retention.record_reference(model, tok, tiny_assets["base"], tmp_path)
    assert retention.read_reference(tmp_path, tiny_assets["base"]) == ref
    own = retention.score_retention(model, tok, ref)
    assert own["close_fraction"] == 1.0 and own["n"] == len(retention.GENERAL_PROMPTS)

    # The log-likelihood against a hand computation: full-sequence forward, sum of log p over the answer.
    total = count = 0
    for prompt, answer in zip(ref["prompts"], ref["answers"]):
        if not answer.strip():
            continue
        ctx = tok(render_prompt(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False)["input_ids"]
        cont = tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
        total += sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        count += len(cont)
    assert count > 0 and math.isclose(own["mean_token_loglik"], total / count, rel_tol=1e-4)

    # Perturbed weights: the base's answers become less likely and fewer greedy answers stay the same.
    moved, _, _ = load_model(tiny_assets["base"], dtype="fp32", device="cpu")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1.0 * p.std().clamp_min(1e-3))
    drift = retention.score_retention(moved, tok, ref)
    assert drift["mean_token_loglik"] < own["mean_token_loglik"] - 0.05
    assert drift["close_fraction"] < 1.0


def test_reference_of_another_base_is_refused(tiny_assets, base, tmp_path):
    model, tok, _ = base
    retention.record_reference(model, tok, tiny_assets["base"], tmp_path)
    other = tmp_path / "other_base"
    other.mkdir()
    for f in tiny_assets["base"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(retention.RetentionError, match="another base model"):
        retention.read_reference(tmp_path, other)
    (tmp_path / retention.REFERENCE_NAME).write_text("{not json")
    with pytest.raises(retention.RetentionError, match="not valid JSON"):
        retention.read_reference(tmp_path, tiny_assets["base"])


def test_demo_targets_by_hand():
    def rec(d2c, cdn, fmt):
        return {"demo": {"desc_to_code": {"score": d2c}, "cdn": {"score": cdn, "parsed_rate": fmt}}}

    t = report.demo_targets({"taia": rec(0.5, 0.0, 0.0), "final": rec(0.45, 0.3, 0.96)})
    assert t["desc->code accuracy after TAIA"]["met"] and t["final keeps of it"]["value"] == pytest.approx(0.9)
    assert all(v["met"] for v in t.values())
    t = report.demo_targets({"taia": rec(0.5, 0.0, 0.0), "final": rec(0.35, 0.3, 0.94)})
    assert not t["final keeps of it"]["met"] and not t["CDN answers in the required format"]["met"]
    t = report.demo_targets({"taia": rec(0.0, 0.0, 0.0), "final": rec(0.0, 0.3, 0.96)})
    assert not t["desc->code accuracy after TAIA"]["met"] and not t["final keeps of it"]["met"]
    assert report.demo_targets({"final": rec(0.4, 0.3, 0.96)}) is None


def test_pipeline_models_in_order_only_those_on_disk(tmp_path):
    def model(path, adapters=None):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        if adapters:
            (path / adapters).mkdir(parents=True)
            (path / adapters / "adapter_config.json").write_text("{}")

    base, run = tmp_path / "base", tmp_path / "run"
    model(base)
    model(run / "merged_base", "knowledge_adapters")
    model(run / "final")
    found = report.pipeline_models(run, run, base)
    assert [k for k, *_ in found] == ["base", "taia", "final"]   # no stage1/adapters yet
    (run / "stage1" / "adapters").mkdir(parents=True)
    (run / "stage1" / "adapters" / "adapter_config.json").write_text("{}")
    found = report.pipeline_models(run, run, base)
    assert [(k, d, a) for k, _, d, a in found] == [
        ("base", base, None), ("stage1", base, run / "stage1" / "adapters"),
        ("taia", run / "merged_base", run / "merged_base" / "knowledge_adapters"), ("final", run / "final", None)]
    assert [k for k, *_ in report.pipeline_models(run, run, base, ["final", "base"])] == ["base", "final"]
    assert report.pipeline_models(run, run, base, []) == []
