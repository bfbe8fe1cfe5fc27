"""The ``train`` stage as the command runs it: which config (a YAML file plus overrides, or a run folder to
resume), which folds (those asked for, or those a resumed run was started for), the preflight, then the
folds one after the other; and the one line an interrupted run prints."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..core.checkpoint import LAST, load_last
from ..core.config import Config, ConfigError
from ..core.config_file import load_config
from ..data.splits import parse_folds
from ..predictions.oof import OOF_FILE
from .loop import train
from .preflight import preflight
from .records import FoldResult
from .resume import finished_fold, run_config, started_folds


@dataclass
class TrainPlan:
    """What ``run_training`` will train: the config, the folds, whether it resumes, and when the command
    started (``train.time_limit`` counts from there)."""

    cfg: Config
    folds: list[int]
    resume: bool
    overwrite: bool = False
    started: float = field(default_factory=time.monotonic)


def plan_training(
    config: str | os.PathLike | None = None,
    resume: bool | str = False,
    fold: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    init_from: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
) -> TrainPlan:
    """The plan of ``competition train``. ``resume``: ``True`` (continue ``config``'s run), a run folder
    (its own ``config.yaml``; the folds it was started for unless ``fold``), or ``False``. ``init_from``,
    ``data_root`` and ``annotations`` are the overrides ``train.init_from``, ``data.root`` and
    ``data.annotations``."""
    started = time.monotonic()
    overrides = list(overrides or [])
    flags = {"train.init_from": init_from, "data.root": data_root, "data.annotations": annotations}
    for key, value in flags.items():
        if value is not None:  # the flags every other stage takes, as their config keys
            overrides.append(f"{key}={Path(value).resolve()}")
    if isinstance(resume, str) and "=" in resume and not Path(resume).is_dir():
        resume, overrides = True, [resume, *overrides]  # `--resume key=value`: an override, not a folder
    if isinstance(resume, str):
        if config:
            raise ConfigError("give --config or a run folder to --resume, not both")
        cfg = run_config(resume, overrides)
    elif config:
        cfg = load_config(config, overrides)
    else:
        raise ConfigError("--config is required (or --resume runs/<name> to continue a run)")
    spec = fold or (",".join(map(str, started_folds(resume))) if isinstance(resume, str) else "all")
    return TrainPlan(cfg, parse_folds(spec, cfg.data.folds), bool(resume), overwrite, started)


def run_training(plan: TrainPlan) -> list[FoldResult]:
    """The preflight (skipped when a resumed run has nothing left), then ``loop.train`` of the plan."""
    cfg, folds = plan.cfg, plan.folds
    finished = plan.resume and all(finished_fold(cfg, k) for k in folds)
    epoch_s = None if finished else preflight(cfg)  # seconds, before any run folder exists
    return train(cfg, folds, plan.resume, plan.overwrite, plan.started, epoch_s)


def interrupted_line(plan: TrainPlan) -> str:
    """One line for an interrupted ``train``: the fold and epoch it stopped in, what ``last.ckpt`` holds,
    how to continue. The fold is the first of the plan's folds without its out-of-fold file."""
    cfg, folds = plan.cfg, plan.folds
    fold = next((k for k in folds if not (cfg.run_dir(k) / OOF_FILE).is_file()), folds[-1])
    run_dir = cfg.run_dir(fold)
    metrics = run_dir / "metrics.csv"
    done = len(pd.read_csv(metrics)) if metrics.is_file() else 0
    saved = load_last(run_dir / LAST)["epoch"] if (run_dir / LAST).is_file() else 0
    kept = f"last.ckpt holds epoch {saved}" if saved else "no epoch checkpointed yet"
    return (
        f"interrupted in fold {fold}, epoch {done + 1} ({kept}): continue with "
        f"competition train --resume {run_dir.parent}"
    )
