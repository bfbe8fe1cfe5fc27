"""Ensembles evaluated out-of-fold, ensemble-weight search, and averaging of saved probability files.

Each training image is out-of-fold in exactly one fold, so a run's OOF predictions (``fold*/oof.npz``)
cover the training set once: their mIoU is the CV score of the fold ensemble. Runs trained on the same folds
file can be combined image by image with weights. Everything streams one image at a time.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checkpoint import CheckpointError
from .infer import fold_dirs, normalize_weights
from .metrics import ConfusionMatrix


def weighted_average(probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """``sum_i w_i p_i`` with weights normalised to sum 1 (float32)."""
    w = normalize_weights(weights, len(probs))
    return sum(float(wi) * p.astype(np.float32) for wi, p in zip(w, probs))


def _oof_files(run: str | os.PathLike) -> list[Path]:
    files = [d / "oof.npz" for d in fold_dirs(run)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"no out-of-fold predictions {missing} (train with train.oof=probs)")
    return files


def iterate_oof(runs: Sequence[str | os.PathLike]) -> Iterator[tuple[str, int, list[np.ndarray], np.ndarray]]:
    """Per training image: ``(image_id, fold index, [probs of each run], target)``."""
    per_run = []
    for run in runs:
        table = {}
        for fold, path in enumerate(_oof_files(run)):
            data = np.load(path)
            for key in data["image_ids"].tolist():
                table[key] = (fold, data)
        per_run.append(table)
    ids = list(per_run[0])
    for r, table in zip(runs[1:], per_run[1:]):
        if set(table) != set(ids):
            raise CheckpointError(
                f"{r} has OOF predictions for other images than {runs[0]}: not the same folds?"
            )
    for key in ids:
        fold, first = per_run[0][key]
        probs = [table[key][1][f"pred__{key}"] for table in per_run]
        if any(p.ndim != 3 for p in probs):
            raise CheckpointError(
                "OOF predictions were saved as argmax (train.oof=argmax); need probabilities"
            )
        if len({p.shape for p in probs}) > 1:
            raise CheckpointError(
                f"OOF maps of image {key} differ in size across runs: {[p.shape for p in probs]}"
            )
        yield key, fold, probs, first[f"target__{key}"]


def evaluate_oof(
    runs: Sequence[str | os.PathLike], weights: Sequence[float] | None = None, ignore_index: int = 255
) -> pd.DataFrame:
    """OOF mIoU of each run's folds, of each run's fold ensemble, and of the weighted multi-run ensemble."""
    runs = [Path(r) for r in runs]
    w = normalize_weights(weights, len(runs))
    matrices: dict[tuple[str, str], ConfusionMatrix] = {}

    def add(name: str, fold: str, pred: np.ndarray, target: np.ndarray, classes: int) -> None:
        cm = matrices.setdefault((name, fold), ConfusionMatrix(classes, ignore_index))
        cm.update(torch.from_numpy(pred), torch.from_numpy(target.astype(np.int64)))

    for _, fold, probs, target in iterate_oof(runs):
        classes = probs[0].shape[0]
        for run, p in zip(runs, probs):
            pred = p.argmax(0)
            add(run.name, f"fold{fold}", pred, target, classes)
            add(run.name, "all folds", pred, target, classes)
        if len(runs) > 1:
            add(
                "ensemble " + "+".join(f"{x:.2f}" for x in w),
                "all folds",
                weighted_average(probs, w).argmax(0),
                target,
                classes,
            )
    rows = [
        {"model": name, "folds": fold, "miou": cm.miou(), "pixel_acc": cm.pixel_accuracy()}
        for (name, fold), cm in matrices.items()
    ]
    return pd.DataFrame(rows)


def search_weights(
    runs: Sequence[str | os.PathLike], step: float = 0.1, ignore_index: int = 255
) -> tuple[np.ndarray, float, pd.DataFrame]:
    """Grid search of ensemble weights on the simplex (``step`` apart) by OOF mIoU, in one pass over images.

    Returns the best weights, their mIoU and the table of every weight vector tried.
    """
    n = len(runs)
    if n < 2:
        raise ValueError("weight search needs at least two runs")
    ticks = int(round(1 / step))
    grid = [np.array(c) / ticks for c in itertools.product(range(ticks + 1), repeat=n) if sum(c) == ticks]
    matrices = [None] * len(grid)
    for _, _, probs, target in iterate_oof(runs):
        stack = np.stack([p.astype(np.float32) for p in probs])
        t = torch.from_numpy(target.astype(np.int64))
        for i, w in enumerate(grid):
            if matrices[i] is None:
                matrices[i] = ConfusionMatrix(stack.shape[1], ignore_index)
            matrices[i].update(torch.from_numpy(np.tensordot(w, stack, 1).argmax(0)), t)
    table = pd.DataFrame(
        [
            {**{f"w_{Path(r).name}": x for r, x in zip(runs, w)}, "miou": m.miou()}
            for w, m in zip(grid, matrices)
        ]
    )
    best = int(table["miou"].idxmax())
    return grid[best], float(table.loc[best, "miou"]), table.sort_values("miou", ascending=False)


def average_prob_files(
    paths: Sequence[str | os.PathLike], keys: Sequence[str], weights: Sequence[float] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, weighted mean probs)`` for each key (test image id) from ``predict --save-probs`` files."""
    files = [np.load(p) for p in paths]
    w = normalize_weights(weights, len(files))
    for path, f in zip(paths, files):
        missing = [k for k in keys if f"pred__{k}" not in f.files]
        if missing:
            raise CheckpointError(f"{path} has no probabilities for images {missing[:5]}")
    for key in keys:
        probs = [f[f"pred__{key}"] for f in files]
        if len({p.shape for p in probs}) > 1:
            raise CheckpointError(f"probability maps of {key} differ in shape: {[p.shape for p in probs]}")
        yield key, weighted_average(probs, w)
