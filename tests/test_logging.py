"""What a run writes for TensorBoard: one event file, expert utilisation as one image and per-layer scalars."""

import subprocess
import sys

from helpers import REPO, base_env, check, train_args


def test_expert_utilisation_is_one_image_per_log_step_in_one_run(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", *train_args(
        tiny_assets, out, stage=1, **{"logging.report_to": "[tensorboard]", "stage1.max_steps": 3,
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


def test_wandb_offline_and_mlflow_file_store_get_the_same_run(tiny_assets, tmp_path, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", *train_args(
        tiny_assets, out, stage=1, **{"logging.report_to": "[tensorboard,wandb,mlflow]", "stage1.max_steps": 3,
                                      "logging.run_name": "tracked", "evaluation.report_models": "[]"})],
        env=base_env(WANDB_MODE="offline", WANDB_SILENT="true"), cwd=REPO, capture_output=True, text=True,
        timeout=600)
    check(proc, "stage 1 with every tracker")
    losses = [v for _, v in json.loads((out / "stage1" / "result.json").read_text())["result"]["losses"]]

    # MLflow: the file store under the run, one run with the settings, every loss against its step, the images.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "medcare-dist"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    from medcare_dist.config import load_config

    rank = load_config(str(REPO / "launch" / "recipes" / "demo.yaml")).adapters.attn_rank
    assert run.data.params["adapters.attn_rank"] == str(rank) and run.data.params["seed"] == "42"
    history = client.get_metric_history(run.info.run_id, "stage1/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == [float(v) for v in losses] or \
        max(abs(m.value - v) for m, v in zip(history, losses)) < 1e-6
    assert run.data.metrics["final/stage1/steps"] == 3
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert artifacts and all("stage1" in a and "expert_utilisation" in a for a in artifacts)

    # wandb offline: one run directory; its records hold the settings, one history row per logged step with
    # every metric of that step, and the final metrics in the summary.
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["adapters"]["attn_rank"] == rank and run_record.display_name == "tracked"
    rows = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    trained = [r for r in rows if "stage1/loss" in r]
    assert [r["stage1/step"] for r in trained] == [1, 2, 3]
    assert max(abs(r["stage1/loss"] - v) for r, v in zip(trained, losses)) < 1e-9
    assert all({"stage1/lr", "stage1/grad_norm", "stage1/expert_utilisation/path"} <= set(r) for r in trained)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    assert summary["final/stage1/steps"] == 3 and summary["final/stage1/train_loss_last"] == trained[-1]["stage1/loss"]


def wandb_records(path):
    """The protobuf records of a wandb offline run file: LevelDB's log format (32 KiB blocks of records with
    a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST) after wandb's 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def test_a_replaced_key_says_what_replaced_it(tmp_path):
    from medcare_dist.config import ConfigError, load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("logging:\n  tensorboard: false\n")
    try:
        load_config(str(recipe))
    except ConfigError as e:
        assert "r.yaml, line 2: logging.tensorboard: this key was replaced by logging.report_to" in str(e), str(e)
    else:
        raise AssertionError("logging.tensorboard was accepted")
