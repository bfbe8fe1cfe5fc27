"""Choosing settings on out-of-fold predictions, with an honest score.

A setting chosen because it scores best on the OOF predictions scores optimistically on those same images.
``FoldTable`` keeps one confusion matrix per (fold, candidate), so that in one pass over the images it can
give both the in-sample choice (best on every fold) and, per fold, the choice made without that fold. Scoring
each fold with the latter gives the nested score, the one to expect on new data.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from ..core.metrics import confusion, miou_of


class FoldTable:
    """Confusion matrices per ``(fold, candidate)``, accumulated image by image."""

    def __init__(self, num_classes: int, ignore_index: int | None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts: dict[tuple[int, Hashable], np.ndarray] = {}
        self.folds: set[int] = set()

    def add(self, fold: int, candidate: Hashable, prediction: np.ndarray, target: np.ndarray) -> None:
        self.add_counts(fold, candidate, confusion(prediction, target, self.num_classes, self.ignore_index))

    def add_counts(self, fold: int, candidate: Hashable, counts: np.ndarray) -> None:
        key = (fold, candidate)
        self.counts[key] = self.counts[key] + counts if key in self.counts else counts.astype(np.int64)
        self.folds.add(fold)

    def matrix(self, candidate: Hashable, folds: Iterable[int] | None = None) -> np.ndarray:
        """Summed matrix of ``candidate`` over ``folds`` (default: all)."""
        total = np.zeros((self.num_classes, self.num_classes), np.int64)
        for f in self.folds if folds is None else folds:
            total += self.counts.get((f, candidate), 0)
        return total

    def miou(self, candidate: Hashable, folds: Iterable[int] | None = None) -> float:
        return miou_of(self.matrix(candidate, folds))

    def best(self, candidates: Sequence[Hashable], without: int | None = None) -> Hashable:
        """The candidate of highest mIoU on every fold (``without``: on every fold but that one). Ties go to
        the earliest candidate, so list the default first."""
        folds = [f for f in sorted(self.folds) if f != without]
        scores = [self.miou(c, folds) for c in candidates]
        return candidates[int(np.nanargmax(scores))]


def nested_folds(table: Any) -> list[int]:
    """The folds of ``table`` (a ``FoldTable`` or ``OofRuns``); a nested score needs at least two."""
    folds = sorted(table.folds)
    if len(folds) < 2:
        raise ValueError("a nested score needs OOF predictions of at least two folds")
    return folds
