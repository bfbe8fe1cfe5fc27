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

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..core import checkpoint as ckpt
from ..core.checkpoint import CheckpointError, fold_folders, read_run_config
from ..core.config import Config, ConfigError
from ..core.config_file import config_from_dict, flat_params
from ..core.io import atomic_write_text
from ..predictions.provenance import VOLATILE_TRAIN_KEYS, patience_spent, read_run
from .records import FoldResult

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
    dirs = list(fold_folders(run_dir).values())  # config.yaml is written before the first epoch ends
    if not dirs:
        raise CheckpointError(f"nothing to resume in {run_dir}: no fold<k>/config.yaml (start the run anew)")
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


RUN_RECORD = "run.json"  # runs/<name>/run.json: the folds the run was started for


def record_folds(cfg: Config, folds: list[int]) -> list[int]:
    """Add ``folds`` to the folds ``cfg``'s run was started for (``RUN_RECORD``, written by rank 0), so that
    ``train --resume RUN_DIR`` continues exactly those; returns ``folds``."""
    run_dir = cfg.output_dir / cfg.name
    if os.environ.get("RANK", "0") == "0":
        known = started_folds(run_dir) if (run_dir / RUN_RECORD).is_file() else []
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_RECORD, json.dumps({"folds": sorted({*known, *folds})}) + "\n")
    return list(folds)


def started_folds(run_dir: str | os.PathLike) -> list[int]:
    """The folds a run was started for (``record_folds``); for a run made before the record, its fold
    folders."""
    path = Path(run_dir) / RUN_RECORD
    if path.is_file():
        try:
            return [int(k) for k in json.loads(path.read_text())["folds"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is malformed ({exc!r}): give --fold to say which folds") from None
    return list(fold_folders(run_dir))


def finished_fold(cfg: Config, fold: int) -> FoldResult | None:
    """Fold ``fold`` of ``cfg``'s run as a ``FoldResult`` when it has nothing left to do (every epoch, or
    ``train.patience`` spent, its best weights and its OOF file when ``train.oof`` asks for one), checked
    against its ``config.yaml`` as a resume is; ``None`` when it still has work."""
    run_dir = cfg.run_dir(fold)
    metrics, needed = run_dir / "metrics.csv", [ckpt.BEST_META, ckpt.LAST, ckpt.CONFIG_FILE]
    needed += [] if cfg.train.oof == "none" else ["oof.npz"]
    if not metrics.is_file() or not all((run_dir / name).is_file() for name in needed):
        return None
    ckpt.check_resumable(cfg, read_run_config(run_dir), run_dir)
    rows = pd.read_csv(metrics)
    early = patience_spent(rows["miou"].tolist(), cfg.train.patience)
    if len(rows) < cfg.train.epochs and not early:
        return None
    best = ckpt.read_best_meta(run_dir)
    return FoldResult(fold, run_dir, best["miou"], best["epoch"], rows, "patience" if early else None)


def last_state(run: Any, epochs_done: int) -> dict[str, Any]:
    """What ``last.ckpt`` holds for a ``train.FoldRun`` after ``epochs_done`` epochs (``load_state`` puts it
    back; the one place of the schema): model, optimizer, scheduler, scaler, EMA and checkpoint-average
    states, best score, skipped steps and RNG states."""
    state = {name: getattr(run, name).state_dict() for name in ("model", "optimizer", "scheduler")}
    state |= {"scaler": run.scaler.state_dict(), "epoch": epochs_done, "best": run.best}
    state |= {"ema": run.ema.state_dict() if run.ema is not None else None}
    return state | {"swa": run.swa.state_dict(), "skipped": run.skips, "rng": ckpt.rng_state()}


def load_state(run: Any, state: dict[str, Any]) -> None:
    """Put ``last_state``'s dictionary back into a ``train.FoldRun`` (``FoldRun.load_state_dict``): every
    state, the epoch to start from, and the learning rate of this step in the schedule now planned."""
    for name in ("model", "optimizer", "scheduler", "scaler"):
        getattr(run, name).load_state_dict(state[name])
    sched = run.scheduler
    for group, base, factor in zip(run.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)
    if run.ema is not None and state["ema"] is not None:
        run.ema.load_state_dict(state["ema"])
    run.swa.load_state_dict(state.get("swa"), state["epoch"] - 1)
    run.epoch_done = state["epoch"] - 1
    run.start_epoch, run.best, run.skips = state["epoch"], dict(state["best"]), dict(state["skipped"])
    ckpt.set_rng_state(state["rng"])


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
    run.load_state_dict(state)
    if (run.run_dir / ckpt.BEST_META).is_file():
        meta = ckpt.read_best_meta(run.run_dir)
        if meta["miou"] > run.best["miou"]:
            run.best = {"miou": meta["miou"], "epoch": meta["epoch"]}
    metrics = run.run_dir / "metrics.csv"
    if metrics.is_file():
        run.rows = pd.read_csv(metrics).query(f"epoch <= {run.start_epoch}").to_dict("records")
    if run.ddp.main:
        print(f"fold {run.fold}: resuming after epoch {run.start_epoch} from {last}")


def init_weights(model: Any, cfg: Config, fold: int, announce: bool = False) -> Any:
    """Load ``train.init_from`` into a new fold's ``model``: a run folder's fold-``fold`` best weights, or a
    ``.safetensors`` file. Fold k's validation images must be images the source model never trained on: a
    run must have trained on the same folds file (its fold-k model never saw fold k's images); a file of
    ours says in its metadata which run, fold and folds file made it (``checkpoint.weights_origin``), and
    must be that fold's model of a run on the same folds file. Another folds file, another fold's file, or a
    file that does not say (a foreign checkpoint) is refused, since the validation score would be
    optimistic, unless ``train.init_any_folds`` (which the run's config records). Returns ``model``;
    ``announce`` prints what was loaded."""
    from ..core.io import file_hash

    source = cfg.train.init_from
    if not source:
        return model
    path = Path(source)
    if path.is_dir():
        (weights, origin), what = _run_weights(path, fold, source), f"run {source}"
    elif path.is_file():
        weights, origin, what = path, ckpt.weights_origin(path), f"weights file {source}"
    else:
        raise ConfigError(f"train.init_from {source} is neither a weights file nor a run folder")
    accept = "set train.init_any_folds=true to accept it"
    if not cfg.train.init_any_folds:
        if origin is None:
            raise ConfigError(
                f"train.init_from {source} does not record which images its model trained on (a file not "
                f"written by competition train): fold {fold}'s validation score could be optimistic. Give a "
                f"run folder or its fold{fold}/best.safetensors, or {accept}"
            )
        if origin.get("folds_hash") != file_hash(cfg.data.folds):
            raise ConfigError(
                f"train.init_from {what} was trained on another folds file than {cfg.data.folds}: its fold "
                f"{fold} model trained on images that fold {fold} validates on, so the validation score "
                f"would be optimistic. Use the same folds file, or {accept}"
            )
        if int(origin.get("fold", -1)) != fold:
            raise ConfigError(
                f"train.init_from {what} is fold {origin.get('fold')}'s model of run {origin.get('run')!r}: "
                f"it trained on fold {fold}'s validation images. Give the run folder (each fold starts from "
                f"its own fold's weights), run the folds one by one with their own files, or {accept}"
            )
    ckpt.load_weights(model, weights)
    if announce:
        print(f"fold {fold}: initialised from {weights}")
    return model


def _run_weights(path: Path, fold: int, source: str) -> tuple[Path, dict[str, Any]]:
    """A run folder's fold-``fold`` best weights (an error when it has none) and their origin."""
    teacher = read_run(path)
    if fold not in teacher.folds or not teacher.folds[fold].has_best:
        raise ConfigError(f"train.init_from {source} has no best weights of fold {fold}")
    origin = {"run": teacher.name, "fold": fold, "folds_hash": teacher.folds_hash}
    return teacher.folds[fold].dir / ckpt.BEST_WEIGHTS, origin
