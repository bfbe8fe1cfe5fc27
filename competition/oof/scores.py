"""What out-of-fold predictions say: the CV table of runs and votes, and how far each label is from them.

Each training image is out-of-fold in exactly one fold, so a run's ``fold*/oof.npz`` files cover the training
set once: their mIoU is the CV score of the fold ensemble. An image's OOF prediction comes from models that
never trained on it, so a label they confidently contradict stands out (``audit_table``). Used by the
``evaluate``, ``audit`` and ``report`` stages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from ..core.metrics import argmax_classes, confusion, miou_of
from ..data.images import read_image
from ..data.panels import save_panels
from ..predictions.oof import ImageMaps, OofRuns, opened
from ..predictions.voting import class_weights, hard_vote, soft_scores, soft_vote
from .nested import FoldTable


@dataclass
class OofScores:
    """One pass over the OOF files of ``runs``: a confusion matrix per (fold, model), where the models are
    each run's fold ensemble and, with several runs, their weighted soft vote and hard vote."""

    table: FoldTable
    runs: list[str]
    votes: list[str]  # [soft vote name, "hard vote"] with several runs, else empty
    class_names: list[str]
    audit: pd.DataFrame | None = None  # with ``files``: every image ranked as ``audit_table`` ranks them
    partial: list[str] = field(default_factory=list)  # problems accepted with --allow-partial

    def frame(self) -> pd.DataFrame:
        """mIoU and pixel accuracy of each run per fold and over all folds, and of the votes overall. The
        overall rows say which folds they cover: ``all folds`` for complete runs, else ``folds 0,1
        (partial)``."""
        folds = sorted(self.table.folds)
        every = f"folds {','.join(map(str, folds))} (partial)" if self.partial else "all folds"
        rows = []
        for run in self.runs:
            rows += [_row(run, f"fold{f}", self.table.matrix(run, [f])) for f in folds]
            rows.append(_row(run, every, self.table.matrix(run)))
        rows += [_row(name, every, self.table.matrix(name)) for name in self.votes]
        return pd.DataFrame(rows)


def score_oof(
    runs: Sequence[str | os.PathLike] | OofRuns,
    weights: np.ndarray | Sequence[float] | None = None,
    allow_partial: bool = False,
    files: Mapping[str, str] | None = None,
) -> OofScores:
    """The ``OofScores`` of ``runs`` (per-run or per-run-and-class ``weights`` for the votes). With ``files``
    (image id -> file name) the same pass also ranks every image as ``audit_table`` does."""
    oof = opened(runs, allow_partial)
    scorer = OofScorer(oof, weights, files)
    oof.feed(scorer)
    return scorer.result()


class OofScorer:
    """``score_oof`` image by image, so that one pass over the OOF files can feed other consumers too
    (``tune.Tuner``): ``oof.feed(scorer, ...)`` (``measure`` on the reading threads, ``merge`` in image
    order), then ``result``."""

    def __init__(self, oof: OofRuns, weights: Any = None, files: Mapping[str, str] | None = None):
        self.oof, self.files, self.rows = oof, files, []
        if files is not None:
            oof.check_files(files, "the runs' data")
        self.w = class_weights(weights, len(oof.runs), oof.num_classes)
        per_class = weights is not None and np.ndim(weights) == 2
        soft = "soft vote " + (
            "per-class weights" if per_class else "+".join(f"{x:.2f}" for x in self.w[:, 0])
        )
        self.votes = [soft, "hard vote"] if len(oof.runs) > 1 else []
        self.table = FoldTable(oof.num_classes, oof.ignore_index)

    def measure(self, key: str, fold: int, probs: ImageMaps, target: np.ndarray) -> tuple:
        """One image's confusion counts per model (and its audit row): reads nothing it changes."""
        classes, ignore = self.oof.num_classes, self.oof.ignore_index
        labels = probs.labels()  # from the stored levels, undecoded
        named = [(run.name, label) for run, label in zip(self.oof.runs, labels)]
        scores = soft_scores(probs.stored, self.w) if self.votes or self.files is not None else None
        voted = soft_vote(probs.stored, self.w, scores) if scores is not None else None
        if self.votes:
            named += [(self.votes[0], voted), ("hard vote", hard_vote(labels, scores, self.w))]
        counts = [(name, confusion(label, target, classes, ignore)) for name, label in named]
        row = None
        if self.files is not None:
            row = _audit_row(key, fold, self.files, scores, target, self.oof, voted)
        return fold, counts, row

    def merge(self, part: tuple) -> None:
        fold, counts, row = part
        for name, matrix in counts:
            self.table.add_counts(fold, name, matrix)
        if row is not None:
            self.rows.append(row)

    def result(self) -> OofScores:
        audit = None if self.files is None else _ranked(self.rows)
        names = [r.name for r in self.oof.runs]
        return OofScores(self.table, names, self.votes, self.oof.class_names, audit, list(self.oof.partial))


def evaluate_oof(
    runs: Sequence[str | os.PathLike] | OofRuns,
    weights: np.ndarray | Sequence[float] | None = None,
    allow_partial: bool = False,
) -> pd.DataFrame:
    """OOF mIoU of each run per fold and over all folds (its fold ensemble's CV score) and, with several runs,
    of the weighted soft vote and of the hard vote."""
    return score_oof(runs, weights, allow_partial).frame()


def _row(name: str, folds: str, matrix: np.ndarray) -> dict:
    total = matrix.sum()
    return {
        "model": name,
        "folds": folds,
        "miou": miou_of(matrix),
        "pixel_acc": float(np.trace(matrix) / total) if total else float("nan"),
    }


EPS = 1e-4  # probability floor of the cross-entropy (float16 OOF maps hold exact zeros)


def image_scores(
    probs: np.ndarray, target: np.ndarray, names: Sequence[str], ignore: int, pred: np.ndarray | None = None
) -> dict:
    """Disagreement of one image's OOF probabilities ``[C, H, W]`` with its label ``[H, W]`` (``pred``: their
    argmax, when the caller has it)."""
    classes = probs.shape[0]
    valid = (target != ignore) & (target < classes)
    pred = argmax_classes(probs) if pred is None else pred
    if not valid.any():
        return {"score": 0.0, "pixel_error": 0.0, "top_confusion": ""}
    t = target[valid].astype(np.int64)
    p_true = np.take_along_axis(probs, np.where(valid, target, 0).astype(np.int64)[None], axis=0)[0][valid]
    wrong = pred[valid] != t
    confusion = ""
    if wrong.any():
        pairs = np.bincount(t[wrong] * classes + pred[valid][wrong], minlength=classes * classes)
        top = int(pairs.argmax())
        confusion = f"{names[top // classes]} -> {names[top % classes]} ({int(pairs[top])} px)"
    return {
        "score": float(-np.log(np.clip(p_true, EPS, 1.0)).mean()),
        "pixel_error": float(wrong.mean()),
        "top_confusion": confusion,
    }


def audit_table(
    runs: Sequence[str | os.PathLike] | OofRuns,
    files: Mapping[str, str],
    weights: np.ndarray | Sequence[float] | None = None,
    allow_partial: bool = False,
) -> pd.DataFrame:
    """Every OOF image with its scores and file name (``files``: image id -> file name), worst first
    (``rank`` 1 = most suspicious)."""
    oof = opened(runs, allow_partial)
    oof.check_files(files, "the runs' data")

    def row(key: str, fold: int, probs: ImageMaps, target: np.ndarray) -> dict:
        scores = soft_scores(probs.stored, weights)
        return _audit_row(key, fold, files, scores, target, oof, soft_vote(probs.stored, weights, scores))

    return _ranked(list(oof.map(row)))


def _audit_row(
    key: str,
    fold: int,
    files: Mapping[str, str],
    scores: np.ndarray,
    target: np.ndarray,
    oof: OofRuns,
    pred: np.ndarray | None = None,
) -> dict:
    row = {"image_id": key, "file_name": files[key], "fold": fold}
    return row | image_scores(scores, target, oof.class_names, oof.ignore_index, pred)


def _ranked(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def write_gallery(
    runs: Sequence[str | os.PathLike] | OofRuns,
    table: pd.DataFrame,
    root: Path,
    out_dir: Path,
    count: int,
    weights: np.ndarray | Sequence[float] | None = None,
    allow_partial: bool = False,
) -> list[Path]:
    """Image | label | OOF prediction panels of the first ``count`` rows of ``table`` (images under
    ``root``; a missing image leaves its panel out)."""
    oof = opened(runs, allow_partial)
    written = []
    for row in table.head(count).itertuples():  # only the drawn images are decompressed
        _, probs, target = oof.read(str(row.image_id))
        path = root / row.file_name
        image = read_image(path) if path.is_file() else None
        if image is not None and image.shape[:2] != target.shape:
            image = cv2.resize(image, target.shape[::-1], interpolation=cv2.INTER_AREA)
        pred = soft_vote(probs.stored, weights)
        title = f"#{row.rank} {row.file_name}  score {row.score:.2f}  {row.top_confusion}"
        name = f"{row.rank:04d}_{Path(row.file_name).with_suffix('').as_posix().replace('/', '_')}.png"
        panels = [("label", target), ("OOF prediction", pred)]
        shown = save_panels(out_dir / name, image, panels, oof.class_names, title, background=oof.background)
        written.append(shown)
    return sorted(written)
