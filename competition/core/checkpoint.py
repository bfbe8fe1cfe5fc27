"""Our checkpoint files: ``best.safetensors`` + ``best.json`` (weights for inference) and ``last.ckpt``
(everything needed to resume). All are written atomically; ``last.ckpt`` is read with ``weights_only=True``
and safetensors never runs code, so loading a checkpoint never executes pickled objects.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from .config import UNET3PLUS_DEFAULTS_BEFORE_PINNING, Config, ConfigError, is_unet3plus
from .config_file import config_from_dict
from .io import atomic_write, atomic_write_text
from .runtime import build_model

BEST_WEIGHTS, BEST_META, LAST, CONFIG_FILE = "best.safetensors", "best.json", "last.ckpt", "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


WEIGHTS_ORIGIN = "smp_unet3p.origin"  # safetensors metadata key: JSON of the run, fold and folds file


def save_weights(model: nn.Module, path: str | os.PathLike, origin: dict[str, Any] | None = None) -> Path:
    """Model weights as safetensors (shared tensors deduplicated), written atomically; ``origin`` (run name,
    fold, folds and config hashes) goes into the file's metadata, so the file alone says which images its
    model trained on (``weights_origin``)."""
    metadata = {WEIGHTS_ORIGIN: json.dumps(origin, sort_keys=True)} if origin else None
    return atomic_write(path, lambda tmp: safetensors.torch.save_model(model, str(tmp), metadata=metadata))


def weights_origin(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``origin`` a weights file was saved with (``save_weights``); ``None`` for a file without one (a
    foreign checkpoint, or one written before it was recorded)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return json.loads(metadata[WEIGHTS_ORIGIN]) if WEIGHTS_ORIGIN in metadata else None


def load_weights(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Strictly load safetensors weights; a mismatch names the first missing/unexpected/misshaped keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = safetensors.torch.load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    own = model.state_dict()
    misshaped = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]  # fmt: skip
    missing, unexpected = [], sorted(set(state) - set(own))
    if not misshaped:  # load_model knows which keys save_model dropped as aliases of shared tensors
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False, device=str(device))
        missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{path} does not match the model (another architecture, encoder or class count?): "
            + "; ".join(
                f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", misshaped))
                if items
            )
        )
    return model


def rng_state() -> dict[str, Any]:
    """Torch (CPU + CUDA), NumPy and Python RNG states as tensors/lists (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": [has_gauss, cached]},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], *np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_last(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Resume checkpoint (``torch.save`` of tensors, dicts, lists and numbers only), atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_last(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a resume checkpoint with ``weights_only=True``: pickled code in the file is never run."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load {path} as a resume checkpoint (weights_only=True): {exc}. Only checkpoints written "
            "by `competition train` are accepted."
        ) from exc


ORIGIN_KEYS = ("run", "fold", "config_hash", "folds_hash", "folds")  # of best.json, in the weights file too


def write_best(run_dir: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    save_weights(model, run_dir / BEST_WEIGHTS, {k: meta[k] for k in ORIGIN_KEYS if k in meta})
    atomic_write_text(run_dir / BEST_META, json.dumps(meta, indent=2))


def read_run_config(run_dir: str | os.PathLike) -> Config:
    """The resolved config a fold directory was trained with."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: is {run_dir} a fold directory written by `competition train`?"
        )
    raw = yaml.safe_load(path.read_text())
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict) and is_unet3plus(model.get("arch", "unet3plus")):
        # a config written before the defaults were pinned: rebuild with the defaults of that time
        model["params"] = {**UNET3PLUS_DEFAULTS_BEFORE_PINNING, **(model.get("params") or {})}
    return config_from_dict(raw, source=str(path))


def read_best_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A fold's ``best.json`` (fold, epoch, scores and classes of its best weights)."""
    path = Path(run_dir) / BEST_META
    if not path.is_file():
        raise CheckpointError(f"{path} not found: fold {Path(run_dir).name} has no best checkpoint yet")
    return json.loads(path.read_text())


def load_fold_model(
    run_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild a fold's model from its ``config.yaml`` and load ``best.safetensors`` (eval mode).

    Returns ``(model, config, best.json contents)``. Never downloads: encoder weights are not fetched.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    meta = read_best_meta(run_dir)
    model = build_model(cfg, len(meta["classes"]), pretrained=False)
    load_weights(model, run_dir / BEST_WEIGHTS, device)
    return model.to(device).eval(), cfg, meta


FOLD_NAME = re.compile(r"fold(0|[1-9][0-9]*)")  # a fold folder's exact name: fold0, fold1, ... fold12


def fold_folders(path: str | os.PathLike, marker: str = CONFIG_FILE) -> dict[int, Path]:
    """The fold folders of a run folder that hold ``marker``, by fold number. Only folders named exactly
    ``fold<k>`` count: a backup copy (``fold0_old``, ``fold1 copy``) is never read as a fold (a warning names
    it). A folder whose ``best.json`` names another fold than its name is an error naming both."""
    import warnings

    found: dict[int, Path] = {}
    for p in sorted(Path(path).glob("fold*")):
        if not (p / marker).is_file():
            continue
        match = FOLD_NAME.fullmatch(p.name)
        if match is None:
            warnings.warn(f"{p} is not read as a fold: only folders named fold<k> are", stacklevel=2)
            continue
        fold = int(match.group(1))
        recorded = read_best_meta(p).get("fold", fold) if (p / BEST_META).is_file() else fold
        if int(recorded) != fold:
            raise CheckpointError(
                f"{p / BEST_META} records fold {recorded}, but its folder is named {p.name}: a fold folder "
                f"copied or renamed? Name it fold{recorded}, or move it out of {Path(path)}"
            )
        found[fold] = p
    return dict(sorted(found.items()))


def fold_dirs(path: str | os.PathLike) -> list[Path]:
    """A fold directory itself, or the ``fold<k>`` directories (with a best checkpoint) of a run directory, in
    fold order (``fold_folders``)."""
    path = Path(path)
    if (path / BEST_META).is_file():
        return [path]
    folds = list(fold_folders(path, BEST_META).values())
    if not folds:
        raise CheckpointError(f"no trained fold (fold<k>/{BEST_META}) in {path}")
    return folds


RESUME_CHECKED = ("data", "model", "loss", "optimizer", "scheduler", "augment")
RESUME_CHECKED_TRAIN = ("batch_size", "accum_steps", "seed")


def check_resumable(cfg: Config, saved: Config, run_dir: str | os.PathLike) -> None:
    """Resuming with another model, loss, optimizer or data would silently train something else: refuse,
    listing the keys that differ from the run's ``config.yaml``. More epochs extend the run; fewer are
    refused."""
    changed = [
        f"{section}.{k}"
        for section in RESUME_CHECKED
        for k, v in getattr(cfg, section).model_dump().items()
        if getattr(saved, section).model_dump()[k] != v
    ]
    changed += [
        f"train.{k}" for k in RESUME_CHECKED_TRAIN if getattr(cfg.train, k) != getattr(saved.train, k)
    ]
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from its config.yaml in {changed}; resume with the "
            "same settings or start over with --overwrite"
        )
    if cfg.train.epochs < saved.train.epochs:
        raise ConfigError(
            f"cannot resume {run_dir} with train.epochs={cfg.train.epochs}: it was planned for "
            f"{saved.train.epochs} epochs; a run can be extended (more epochs), not shortened"
        )
