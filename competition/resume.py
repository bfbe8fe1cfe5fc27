"""Continuing a run from its folder (``competition train --resume RUN_DIR``), and starting one from another
run's weights (``train --init-from RUN_DIR|FILE``, ``init_weights``).

The run's own ``config.yaml`` (paths already resolved) is the config, so nothing given when it started has
to be repeated. Overrides given with it may only change what a resume keeps exact (``MAY_CHANGE``: workers,
device, progress bars, loggers, validation batch size, checkpoint interval) or extend the run:
``train.epochs`` larger than before continues finished folds, and from the next optimizer step the learning
rate follows the schedule of a run planned with the new number of epochs (``FoldRun.resume``). Anything
else would silently train something other than the run it continues, and is refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from . import checkpoint as ckpt
from .checkpoint import CheckpointError, fold_dirs, read_run_config
from .config import Config, ConfigError, config_from_dict
from .provenance import VOLATILE_TRAIN_KEYS
from .tracking import flat_params

MAY_CHANGE = (*VOLATILE_TRAIN_KEYS, "checkpoint_every", "patience")


def changed_keys(cfg: Config, saved: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (``output_dir`` left out)."""
    new, old = flat_params(cfg.model_dump(mode="json")), flat_params(saved.model_dump(mode="json"))
    return sorted(k for k in new.keys() | old.keys() if k != "output_dir" and new.get(k) != old.get(k))


def run_config(run_dir: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """The config to resume ``run_dir`` (``runs/<name>``) with: its saved config plus ``overrides``, which
    may only touch ``MAY_CHANGE`` or raise ``train.epochs``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} not found (competition train --resume runs/<name>)")
    dirs = fold_dirs(run_dir)
    saved = read_run_config(dirs[0])
    if saved.name != run_dir.name:
        raise ConfigError(
            f"{run_dir} holds run {saved.name!r} (name in {dirs[0] / 'config.yaml'}): rename the folder back "
            f"to {saved.name}, or start a new run"
        )
    raw = saved.model_dump(mode="json") | {"output_dir": str(run_dir.parent.resolve())}
    cfg = config_from_dict(raw, overrides, source=f"{run_dir} + overrides")
    refused = [k for k in changed_keys(cfg, saved) if k.removeprefix("train.") not in (*MAY_CHANGE, "epochs")]
    if refused:
        raise ConfigError(
            f"cannot change {refused} when resuming {run_dir}: only train.epochs (to extend the run) and "
            f"{['train.' + k for k in MAY_CHANGE]} may change. To train something else, start a new run "
            f"(--config {dirs[0] / 'config.yaml'} name=NEW ...)"
        )
    return cfg  # each fold checks it against its own config.yaml too (checkpoint.check_resumable)


def restore(run: Any) -> None:
    """Restore every state of a ``train.FoldRun`` from its ``last.ckpt``. The learning rate is set to this
    step's in the schedule now planned (``train.epochs`` may have grown); the best score is never lowered
    below ``best.json``'s (it may be newer than ``last.ckpt``: an epoch being re-run)."""
    last = run.run_dir / ckpt.LAST
    if not last.is_file():
        if run.ddp.main:
            print(f"fold {run.fold}: nothing to resume in {run.run_dir}, starting from scratch")
        return
    state = ckpt.load_last(last, run.device)
    ckpt.check_resumable(run.cfg, ckpt.read_run_config(run.run_dir), run.run_dir)
    for name in ("model", "optimizer", "scheduler", "scaler"):
        getattr(run, name).load_state_dict(state[name])
    sched = run.scheduler
    for group, base, factor in zip(run.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)
    if run.ema is not None and state["ema"] is not None:
        run.ema.load_state_dict(state["ema"])
    run.swa.load_state_dict(state.get("swa"))
    run.epoch_done = state["epoch"] - 1
    run.start_epoch, run.best, run.skips = state["epoch"], dict(state["best"]), dict(state["skipped"])
    if (run.run_dir / ckpt.BEST_META).is_file():
        meta = ckpt.read_best_meta(run.run_dir)
        if meta["miou"] > run.best["miou"]:
            run.best = {"miou": meta["miou"], "epoch": meta["epoch"]}
    ckpt.set_rng_state(state["rng"])
    metrics = run.run_dir / "metrics.csv"
    if metrics.is_file():
        run.rows = pd.read_csv(metrics).query(f"epoch <= {run.start_epoch}").to_dict("records")
    if run.ddp.main:
        print(f"fold {run.fold}: resuming after epoch {run.start_epoch} from {last}")


def init_weights(model: Any, cfg: Config, fold: int, announce: bool = False) -> Any:
    """Load ``train.init_from`` into a new fold's ``model``: a ``.safetensors`` file as it is, or a run
    folder's fold-``fold`` best weights. That run must have been trained on the same folds file: its fold-k
    model never saw fold k's images, which are this fold's validation set. Another folds file is refused
    (its models trained on this fold's validation images: the validation score would be optimistic) unless
    ``train.init_any_folds``. Returns ``model``; ``announce`` prints what was loaded."""
    from .io import file_hash
    from .provenance import read_run

    source = cfg.train.init_from
    if not source:
        return model
    path = Path(source)
    if path.is_file():
        ckpt.load_weights(model, path)
        if announce:
            print(f"fold {fold}: initialised from {path}")
        return model
    if not path.is_dir():
        raise ConfigError(f"train.init_from {source} is neither a weights file nor a run folder")
    teacher = read_run(path)
    if fold not in teacher.folds or not teacher.folds[fold].has_best:
        raise ConfigError(f"train.init_from {source} has no best weights of fold {fold}")
    if teacher.folds_hash != file_hash(cfg.data.folds) and not cfg.train.init_any_folds:
        raise ConfigError(
            f"train.init_from {source} was trained on another folds file than {cfg.data.folds}: its fold "
            f"{fold} model trained on images that fold {fold} validates on, so the validation score would be "
            "optimistic. Use the same folds file, or set train.init_any_folds=true to accept it"
        )
    weights = teacher.folds[fold].dir / ckpt.BEST_WEIGHTS
    ckpt.load_weights(model, weights)
    if announce:
        print(f"fold {fold}: initialised from {weights}")
    return model
