"""Ensembles evaluated out-of-fold, ensemble-weight search, and averaging of saved probability files.

Each training image is out-of-fold in exactly one fold, so a run's OOF predictions (``fold*/oof.npz``)
cover the training set once: their mIoU is the CV score of the fold ensemble. Runs trained on the same folds
file can be combined image by image with weights. Everything streams one image at a time.

Weights chosen on the OOF predictions score optimistically on those same predictions. ``search_weights``
therefore reports two numbers: the in-sample score and a nested one, where each fold is scored with the
weights chosen on the other folds only.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .checkpoint import CheckpointError
from .metrics import ConfusionMatrix
from .oof import OofRuns, check_same_classes, stored_class_names
from .runtime import normalize_weights


def weighted_average(probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """``sum_i w_i p_i`` with weights normalised to sum 1 (float32)."""
    w = normalize_weights(weights, len(probs))
    return sum(float(wi) * p.astype(np.float32) for wi, p in zip(w, probs))


def _update(matrix: ConfusionMatrix, pred: np.ndarray, target: np.ndarray) -> None:
    matrix.update(torch.from_numpy(pred), torch.from_numpy(target.astype(np.int64)))


def evaluate_oof(runs: Sequence[str | os.PathLike], weights: Sequence[float] | None = None) -> pd.DataFrame:
    """OOF mIoU of each run's folds, of each run's fold ensemble, and of the weighted multi-run ensemble."""
    oof = OofRuns(runs)
    w = normalize_weights(weights, len(oof.runs))
    matrices: dict[tuple[str, str], ConfusionMatrix] = {}

    def add(name: str, fold: str, pred: np.ndarray, target: np.ndarray) -> None:
        matrix = matrices.setdefault((name, fold), ConfusionMatrix(oof.num_classes, oof.ignore_index))
        _update(matrix, pred, target)

    for _, fold, probs, target in oof:
        for run, p in zip(oof.runs, probs):
            pred = p.argmax(0)
            add(run.name, f"fold{fold}", pred, target)
            add(run.name, "all folds", pred, target)
        if len(oof.runs) > 1:
            name = "ensemble " + "+".join(f"{x:.2f}" for x in w)
            add(name, "all folds", weighted_average(probs, w).argmax(0), target)
    rows = [
        {"model": name, "folds": fold, "miou": cm.miou(), "pixel_acc": cm.pixel_accuracy()}
        for (name, fold), cm in matrices.items()
    ]
    return pd.DataFrame(rows)


@dataclass
class WeightSearch:
    """Result of ``search_weights``."""

    weights: np.ndarray  # best on every fold together
    in_sample: float  # their OOF mIoU, on the images they were chosen on (optimistic)
    nested: float  # OOF mIoU where each fold is scored with the weights chosen on the other folds
    fold_weights: dict[int, np.ndarray]  # the weights chosen without each fold
    table: pd.DataFrame  # every weight vector tried, best first (in-sample mIoU)


def _sum(matrices: Sequence[ConfusionMatrix]) -> ConfusionMatrix:
    total = ConfusionMatrix(matrices[0].num_classes, matrices[0].ignore_index)
    for m in matrices:
        total.matrix += m.matrix
    return total


def search_weights(runs: Sequence[str | os.PathLike], step: float = 0.1) -> WeightSearch:
    """Grid search of ensemble weights on the simplex (``step`` apart) by OOF mIoU, in one pass over images,
    with the nested-by-folds score next to the in-sample one (module docstring)."""
    oof = OofRuns(runs)
    n = len(oof.runs)
    if n < 2:
        raise ValueError("weight search needs at least two runs")
    if len(oof.folds) < 2:
        raise ValueError("the nested score of a weight search needs OOF predictions of at least two folds")
    ticks = int(round(1 / step))
    grid = [np.array(c) / ticks for c in itertools.product(range(ticks + 1), repeat=n) if sum(c) == ticks]
    per_fold = {
        f: [ConfusionMatrix(oof.num_classes, oof.ignore_index) for _ in grid] for f in oof.folds
    }  # [fold][grid point]
    for _, fold, probs, target in oof:
        stack = np.stack([p.astype(np.float32) for p in probs])
        for matrix, w in zip(per_fold[fold], grid):
            _update(matrix, np.tensordot(w, stack, 1).argmax(0), target)
    overall = [_sum([per_fold[f][i] for f in oof.folds]).miou() for i in range(len(grid))]
    best = int(np.nanargmax(overall))
    fold_weights, held_out = {}, []
    for f in oof.folds:
        others = [_sum([per_fold[g][i] for g in oof.folds if g != f]).miou() for i in range(len(grid))]
        chosen = int(np.nanargmax(others))
        fold_weights[f] = grid[chosen]
        held_out.append(per_fold[f][chosen])
    names = [f"w_{r.name}" for r in oof.runs]
    table = pd.DataFrame([{**dict(zip(names, w)), "miou": m} for w, m in zip(grid, overall)])
    return WeightSearch(
        grid[best],
        float(overall[best]),
        _sum(held_out).miou(),
        fold_weights,
        table.sort_values("miou", ascending=False),
    )


def average_prob_files(
    paths: Sequence[str | os.PathLike], keys: Sequence[str], weights: Sequence[float] | None = None
) -> tuple[list[str], Iterator[tuple[str, np.ndarray]]]:
    """The common class names of ``predict --save-probs`` files and an iterator of ``(key, weighted mean
    probs)`` for each key (test image id). Files of other class lists, or missing keys, are refused first."""
    files = [np.load(p) for p in paths]
    w = normalize_weights(weights, len(files))
    names = check_same_classes([(str(p), stored_class_names(f, p)) for p, f in zip(paths, files)])
    for path, f in zip(paths, files):
        missing = [k for k in keys if f"pred__{k}" not in f.files]
        if missing:
            raise CheckpointError(f"{path} has no probabilities for images {missing[:5]}")

    def iterate() -> Iterator[tuple[str, np.ndarray]]:
        for key in keys:
            probs = [f[f"pred__{key}"] for f in files]
            if len({p.shape for p in probs}) > 1:
                raise CheckpointError(
                    f"probability maps of {key} differ in shape: {[p.shape for p in probs]}"
                )
            yield key, weighted_average(probs, w)

    return names, iterate()
