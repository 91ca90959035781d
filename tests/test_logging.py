"""What a run writes for TensorBoard: one event file, expert utilisation as one image and per-layer scalars."""

import subprocess
import sys

from helpers import REPO, base_env, check, train_args


def test_expert_utilisation_is_one_image_per_log_step_in_one_run(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", *train_args(
        tiny_assets, out, stage=1, **{"logging.tensorboard": True, "stage1.max_steps": 3,
                                      "evaluation.report_models": "[]"})],
        env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    check(proc, "stage 1 with TensorBoard")
    tb = out / "tensorboard"
    assert [p for p in tb.rglob("*") if p.is_dir()] == []          # no run folder per layer x expert
    acc = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    images = acc.Tags()["images"]
    assert images == ["stage1/expert_utilisation"], images
    steps = [e.step for e in acc.Images("stage1/expert_utilisation")]
    assert steps == [1, 2, 3]                                      # log_every 1
    layers = [t for t in acc.Tags()["scalars"] if t.startswith("stage1/expert_imbalance/")]
    assert len(layers) == 2 * 3                                    # 2 layers x gate/up/down
    for tag in layers:
        value = acc.Scalars(tag)[-1].value
        assert 1.0 <= value <= 4.0 + 1e-6, (tag, value)            # max share x E: 1 balanced .. E all to one
