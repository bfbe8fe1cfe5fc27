"""Experiment tracking: ``train.loggers`` sends each fold's config, epoch metrics and artifacts to
TensorBoard, MLflow and/or Weights & Biases, besides the ``metrics.csv`` every run directory holds.

- ``csv``: ``metrics.csv`` and ``curves.png`` (always written; the run directory's own record).
- ``tensorboard``: ``fold<k>/tensorboard/`` through ``torch.utils.tensorboard`` (``tensorboard --logdir``).
- ``mlflow``: one MLflow run per fold in experiment ``<name>``; the store is ``$MLFLOW_TRACKING_URI`` when
  set, else ``<output_dir>/<name>/mlflow.db`` (SQLite) with artifacts in ``<output_dir>/<name>/mlartifacts``.
- ``wandb``: one W&B run per fold (project and group ``<name>``) under ``fold<k>/wandb/``, offline unless
  you are logged in (``WANDB_API_KEY`` or ``wandb login``) or ``WANDB_MODE`` says otherwise; ``wandb sync``
  uploads an offline run later.

Each tool's run id and the last epoch logged are kept in ``fold<k>/tracking.json``, so ``--resume``
continues the same tracked runs and logs each epoch once (an epoch re-run after the last checkpoint is not
logged again); a config value a resume may change (``train.workers`` ...) is recorded as a tag
``changed_on_resume.<key>`` (MLflow) or a config update (W&B) instead of failing. ``--overwrite`` removes
``tracking.json`` and the fold's TensorBoard and W&B folders, so a fresh run starts fresh tracked runs.
Only rank 0 logs under DDP. Per-class IoU is logged as ``iou/<class>``; classes absent from the validation
fold (NaN) are left out.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.config_file import flat_params
from ..core.io import atomic_write_text

IDS_FILE = "tracking.json"
TRACKING = (IDS_FILE, "tensorboard", "wandb")  # what a fold's trackers write (removed on --overwrite)


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a ``metrics.csv`` row, ``iou_<class>`` renamed ``iou/<class>``."""
    out = {}
    for key, value in row.items():
        if key == "epoch" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[f"iou/{key[4:]}" if key.startswith("iou_") else key] = float(value)
    return out


class TensorBoardLogger:
    def __init__(self, cfg: Config, run_dir: Path, ids: dict[str, str]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + cfg.to_yaml() + "\n```")

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, artifacts: dict[str, str], status: str) -> None:
        lines = [f"{k}: {v}" for k, v in artifacts.items()] + [f"status: {status}"]
        self.writer.add_text("artifacts", "\n\n".join(lines))
        self.writer.close()


class MlflowLogger:
    def __init__(self, cfg: Config, run_dir: Path, ids: dict[str, str]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its table-creation chatter
        root = (cfg.output_dir / cfg.name).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(cfg.name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None if "MLFLOW_TRACKING_URI" in os.environ else (root / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(cfg.name, artifact_location=location)
        if "mlflow" not in ids:
            ids["mlflow"] = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        self.run_id = ids["mlflow"]
        logged = self.client.get_run(self.run_id).data.params  # a resumed run's params are immutable
        current = {k: v[:6000] for k, v in flat_params(cfg.model_dump(mode="json")).items()}
        params = [Param(k, v) for k, v in current.items() if k not in logged]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        for k, v in current.items():
            if k in logged and logged[k] != v:
                self.client.set_tag(self.run_id, f"changed_on_resume.{k}", f"{logged[k]} -> {v}")

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, artifacts: dict[str, str], status: str) -> None:
        for key, path in artifacts.items():
            self.client.set_tag(self.run_id, key, path)
            if path.endswith((".png", ".json")) and Path(path).is_file():
                self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, status)


def _wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class WandbLogger:
    def __init__(self, cfg: Config, run_dir: Path, ids: dict[str, str]):
        import wandb

        resumed = "wandb" in ids
        ids.setdefault("wandb", secrets.token_hex(6))
        config = cfg.model_dump(mode="json")
        self.run = wandb.init(
            project=cfg.name, group=cfg.name, name=run_dir.name, id=ids["wandb"], resume="allow",
            dir=str(run_dir), config=None if resumed else config, mode=_wandb_mode(),
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )  # fmt: skip
        if resumed:  # values a resume may change replace the old ones instead of failing
            self.run.config.update(config, allow_val_change=True)

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, artifacts: dict[str, str], status: str) -> None:
        self.run.summary.update(artifacts | {"status": status})
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


LOGGERS = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger, "wandb": WandbLogger}


class Trackers:
    """Every configured logger of one fold (none on ranks other than 0). Use as a context manager: leaving
    it finishes the tracked runs, as ``FAILED`` when an exception is on its way out."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool = True):
        self.run_dir, self.loggers = run_dir, []
        names = [n for n in cfg.train.loggers if n != "csv"] if enabled else []
        if not names:
            return
        self.path = run_dir / IDS_FILE
        self.ids = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.loggers = [LOGGERS[n](cfg, run_dir, self.ids) for n in names]
        atomic_write_text(self.path, json.dumps(self.ids))

    def epoch(self, row: Mapping[str, Any]) -> None:
        """Log one epoch's row, unless a run before a resume logged that epoch already."""
        step = int(row["epoch"])
        if not self.loggers or step <= self.ids.get("logged_epoch", 0):
            return
        metrics = epoch_metrics(row)
        for logger in self.loggers:
            logger.epoch(step, metrics)
        self.ids["logged_epoch"] = step
        atomic_write_text(self.path, json.dumps(self.ids))

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        status = "FINISHED" if kind is None else "FAILED"
        artifacts = artifacts_of(self.run_dir) if self.loggers else {}
        for logger in self.loggers:
            logger.finish(artifacts, status)


def artifacts_of(run_dir: Path) -> dict[str, str]:
    """Paths of a fold's files worth pointing to from a tracker (those that exist)."""
    names = {"best_weights": "best.safetensors", "best_meta": "best.json", "curves": "curves.png",
             "metrics": "metrics.csv", "oof": "oof.npz"}  # fmt: skip
    return {k: str((run_dir / f).resolve()) for k, f in names.items() if (run_dir / f).is_file()}
