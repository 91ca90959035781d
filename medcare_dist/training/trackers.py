"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) behind one writer that rank 0 logs through.

Each is imported only when `logging.report_to` names it; a missing package stops the run before training
with the pip extra to install (check_installed). Scalars keep the stage's own optimizer step as their x axis (stage 2 starts
at step 1 again), images are CHW float arrays in [0, 1], and the run's settings and final metrics go to
every tracker.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from medcare_dist.errors import InputError

log = logging.getLogger(__name__)

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # pip install 'medcare-dist[<extra>]'


class TrackerError(InputError, RuntimeError):
    """A tracker that was asked for and cannot start."""


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_installed(names):
    """TrackerError naming the pip extra of every tracker in `names` that is not installed (TensorBoard
    comes with the project). Called on every rank before any work, so that all stop alike."""
    import importlib.util

    missing = [n for n in names if n in EXTRAS and importlib.util.find_spec(n) is None]
    if missing:
        raise TrackerError(f"logging.report_to names {', '.join(missing)}, not installed; pip install "
                           + " ".join(f"'medcare-dist[{EXTRAS[n]}]'" for n in missing))


class _TensorBoard:
    def __init__(self, out: Path, run_name: str, config: dict, settings):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def scalar(self, tag, value, step):
        self.writer.add_scalar(tag, value, step)

    def image(self, tag, chw, step):
        self.writer.add_image(tag, chw, step)

    def summary(self, metrics: dict):
        for k, v in metrics.items():
            self.writer.add_scalar(f"final/{k}", v, 0)

    def close(self):
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, run_name: str, config: dict, settings):
        import wandb

        self.wandb = wandb
        # WANDB_MODE (online, offline, disabled) and WANDB_API_KEY are wandb's own; offline runs are kept
        # under <output_dir>/wandb for `wandb sync`.
        self.run = wandb.init(project=settings.project, name=run_name, dir=str(out), config=config,
                              resume="allow", id=_run_id(out, "wandb"))
        self.stages = set()
        self.pending, self.at = {}, None  # one wandb.log per (stage, step), not one per value

    def _row(self, tag, step) -> dict:
        stage = tag.split("/", 1)[0]
        if (stage, step) != self.at:
            self.flush()
            self.at = (stage, step)
        if stage not in self.stages:  # each stage's metrics against its own step
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.pending[f"{stage}/step"] = step
        return self.pending

    def flush(self):
        if self.pending:
            self.run.log(self.pending)
        self.pending = {}

    def scalar(self, tag, value, step):
        self._row(tag, step)[tag] = value

    def image(self, tag, chw, step):
        self._row(tag, step)[tag] = self.wandb.Image(chw.transpose(1, 2, 0))

    def summary(self, metrics: dict):
        self.flush()
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items()})

    def close(self):
        self.flush()
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, run_name: str, config: dict, settings):
        import mlflow

        self.mlflow = mlflow
        uri = settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # The default: a file store inside the run. MLflow 3 keeps that backend in maintenance mode and
            # refuses it unless asked; a server or sqlite:// URI goes in logging.mlflow_tracking_uri.
            uri = (out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(settings.project)
        id_file = out / ".mlflow_run_id"  # one MLflow run per output_dir, reopened on resume
        resumed = id_file.read_text().strip() if id_file.is_file() else None
        self.run = mlflow.start_run(run_id=resumed, run_name=None if resumed else run_name)
        id_file.write_text(self.run.info.run_id)
        log.info("MLflow: run %s in experiment %r at %s", self.run.info.run_id, settings.project, uri)
        if not mlflow.get_run(self.run.info.run_id).data.params:  # a reopened run keeps the params it has
            mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                               for k, v in _flatten(config).items()})

    def scalar(self, tag, value, step):
        self.mlflow.log_metric(tag, float(value), step=step)

    def image(self, tag, chw, step):
        self.mlflow.log_image(chw.transpose(1, 2, 0), key=tag, step=step)

    def summary(self, metrics: dict):
        self.mlflow.log_metrics({f"final/{k}": float(v) for k, v in metrics.items()})

    def close(self):
        self.mlflow.end_run()


def _run_id(out: Path, name: str) -> str:
    """One tracker run per output_dir, across resumes: an id kept in the run directory."""
    path = out / f".{name}_run_id"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


def final_metrics(report: dict) -> dict:
    """The numbers of report.json a tracker's run summary should carry: per stage the last training loss,
    the best validation loss and tokens/s, and the held-out scores of the final model (the demo's)."""
    out = {}
    for stage, s in report.get("stages", {}).items():
        for key in ("train_loss_last", "val_loss_best", "tokens_per_s", "steps"):
            if s.get(key) is not None:
                out[f"{stage}/{key}"] = s[key]
    for task, res in (report.get("eval") or {}).items():
        if res.get("score") is not None:
            out[f"eval/{task}/{res['metric']}"] = res["score"]
    return out


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """Every tracker `logging.report_to` names; add_scalar / add_image reach them all (rank 0 only)."""

    def __init__(self, names, out_dir, run_name: str, config: dict, settings):
        out = Path(out_dir)
        self.names = list(names)
        self.backends = []
        for name in self.names:
            self.backends.append(BACKENDS[name](out, run_name, config, settings))
        if self.names:
            log.info("trackers: %s (run %r)", ", ".join(self.names), run_name)

    def add_scalar(self, tag: str, value, step: int):
        for b in self.backends:
            b.scalar(tag, float(value), step)

    def add_image(self, tag: str, chw, step: int):
        import numpy as np

        chw = np.asarray(chw.detach().cpu() if hasattr(chw, "detach") else chw, dtype=np.float32)
        for b in self.backends:
            b.image(tag, chw, step)

    def summary(self, metrics: dict):
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for b in self.backends:
            b.summary(metrics)

    def close(self):
        for b in self.backends:
            b.close()
