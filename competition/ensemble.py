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
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import CheckpointError
from .io import atomic_write_text
from .oof import OofRuns, check_same_classes, stored_class_names
from .tuning import FoldTable, nested_folds
from .voting import class_weights, combine


@dataclass
class WeightSearch:
    """Result of ``search_weights``."""

    weights: np.ndarray  # best on every fold together: [runs], or [runs, classes] with per_class
    in_sample: float  # their OOF mIoU, on the images they were chosen on (optimistic)
    nested: float  # OOF mIoU where each fold is scored with the weights chosen on the other folds
    fold_weights: dict[int, np.ndarray]  # the weights chosen without each fold
    table: pd.DataFrame  # every per-run weight vector tried, best first (in-sample mIoU)


def _simplex(members: int, step: float) -> list[np.ndarray]:
    ticks = int(round(1 / step))
    points = itertools.product(range(ticks + 1), repeat=members)
    return [np.array(c) / ticks for c in points if sum(c) == ticks]


def search_weights(
    runs: Sequence[str | os.PathLike], step: float = 0.1, per_class: bool = False
) -> WeightSearch:
    """Grid search of run weights on the simplex (``step`` apart) by OOF mIoU, with the nested-by-folds score
    next to the in-sample one (module docstring).

    ``per_class``: then, starting from the best per-run weights, each class's column of weights is chosen on
    its own from the same grid (the other classes keep the per-run weights). The nested score repeats the
    whole search without each fold.
    """
    oof = OofRuns(runs)
    if len(oof.runs) < 2:
        raise ValueError("weight search needs at least two runs")
    grid = _simplex(len(oof.runs), step)
    per_run = FoldTable(oof.num_classes, oof.ignore_index)
    for _, fold, probs, target in oof:
        stack = np.stack([p.astype(np.float32) for p in probs])
        for i, w in enumerate(grid):
            per_run.add(fold, i, np.tensordot(w, stack, 1).argmax(0), target)
    folds = nested_folds(per_run)
    keys = list(range(len(grid)))
    chosen = {None: grid[per_run.best(keys)], **{f: grid[per_run.best(keys, without=f)] for f in folds}}
    if per_class:
        chosen = _per_class(oof, grid, chosen)
    final = FoldTable(oof.num_classes, oof.ignore_index)
    for _, fold, probs, target in oof:
        final.add(fold, "in", combine(probs, chosen[None]), target)
        final.add(fold, "nested", combine(probs, chosen[fold]), target)
    names = [f"w_{r.name}" for r in oof.runs]
    table = pd.DataFrame([{**dict(zip(names, w)), "miou": per_run.miou(i)} for i, w in enumerate(grid)])
    return WeightSearch(
        chosen[None],
        final.miou("in"),
        final.miou("nested"),
        {f: chosen[f] for f in folds},
        table.sort_values("miou", ascending=False),
    )


def _per_class(oof: OofRuns, grid: list[np.ndarray], bases: dict) -> dict:
    """Per base (``None``: all folds; ``f``: every fold but f), each class's weight column chosen on the folds
    that base may see, the others kept at the base's per-run weights."""
    classes = oof.num_classes
    tables = {b: FoldTable(classes, oof.ignore_index) for b in bases}
    for _, fold, probs, target in oof:
        for b, base in bases.items():
            if b == fold:
                continue  # never tune on the fold this base is scored on
            full = class_weights(base, len(probs), classes)
            for c in range(classes):
                for i, g in enumerate(grid):
                    w = full.copy()
                    w[:, c] = g
                    tables[b].add(fold, (c, i), combine(probs, w), target)
    out = {}
    for b, base in bases.items():
        w = class_weights(base, len(oof.runs), classes)
        start = next(i for i, g in enumerate(grid) if np.allclose(g, base))
        for c in range(classes):
            order = [(c, start)] + [(c, i) for i in range(len(grid)) if i != start]  # ties keep the base
            w[:, c] = grid[tables[b].best(order)[1]]
        out[b] = w
    return out


def read_prob_files(
    paths: Sequence[str | os.PathLike], keys: Sequence[str]
) -> tuple[list[str], Iterator[tuple[str, list[np.ndarray]]]]:
    """The common class names of ``predict --save-probs`` files and an iterator of ``(key, [probabilities of
    each file])`` for each key (test image id). Files of other class lists, or missing keys, are refused
    before anything is read."""
    files = [np.load(p) for p in paths]
    names = check_same_classes([(str(p), stored_class_names(f, p)) for p, f in zip(paths, files)])
    for path, f in zip(paths, files):
        missing = [k for k in keys if f"pred__{k}" not in f.files]
        if missing:
            raise CheckpointError(f"{path} has no probabilities for images {missing[:5]}")

    def iterate() -> Iterator[tuple[str, list[np.ndarray]]]:
        for key in keys:
            probs = [f[f"pred__{key}"] for f in files]
            if len({p.shape for p in probs}) > 1:
                raise CheckpointError(
                    f"probability maps of {key} differ in shape: {[p.shape for p in probs]}"
                )
            yield key, probs

    return names, iterate()


def save_weights(
    path: str | os.PathLike,
    found: WeightSearch,
    runs: Sequence[str | os.PathLike],
    class_names: Sequence[str],
    overwrite: bool = False,
) -> None:
    """``weights.json``: searched weights, their runs and classes (read by ``ensemble --weights-file``)."""
    data = {
        "runs": [str(r) for r in runs],
        "class_names": list(class_names),
        "weights": found.weights.tolist(),
    }
    data |= {"oof_miou_in_sample": found.in_sample, "oof_miou_nested": found.nested}
    atomic_write_text(path, json.dumps(data, indent=2), overwrite)


def load_weights(path: str | os.PathLike, members: int, class_names: Sequence[str]) -> np.ndarray:
    """Weights from ``save_weights``, checked against the number of members and their classes."""
    data = json.loads(Path(path).read_text())
    if data["class_names"] != list(class_names):
        raise ValueError(f"{path} holds weights for classes {data['class_names']}, not {list(class_names)}")
    weights = np.asarray(data["weights"], dtype=np.float64)
    if len(weights) != members:
        raise ValueError(
            f"{path} holds weights for {len(weights)} runs ({data['runs']}), got {members} files"
        )
    return weights
