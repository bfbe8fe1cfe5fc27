"""A stratified pixel sample of out-of-fold predictions, and many weight vectors scored on it at once.

A weight search scores hundreds of weight vectors (1001 for 5 runs on a 0.1 grid). Re-voting every pixel of
every image for each vector costs hours at competition size (3272 images at 256 px). Instead one pass over
the OOF files keeps, per image, a sample of its labelled pixels: every class present gets an equal quota
(so rare classes are represented), and each sampled pixel carries a weight, the number of pixels of its
image and class it stands for. The weighted confusion matrix of the sample is then an unbiased estimate of
the full one, and ``vote_counts`` scores a whole grid of weight vectors on it with a few matrix products
(pixels where every run's argmax agrees are counted once for the whole grid: a convex combination of
probability maps with the same argmax has that argmax too).
Images with no more labelled pixels than the quota are taken whole (the sample is then exact).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..predictions.oof import ImageMaps, OofRuns


@dataclass
class OofSample:
    """Sampled pixels of every image of some runs' OOF files."""

    probs: np.ndarray  # [N, R, C] float16: each run's probabilities at the sampled pixels
    target: np.ndarray  # [N] int64: the label of each sampled pixel
    weight: np.ndarray  # [N] float64: how many pixels of its image and class each one stands for
    fold: np.ndarray  # [N] int64: the fold the pixel's image is out-of-fold in
    num_classes: int

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in np.unique(self.fold))


def sample_pixels(
    target: np.ndarray, classes: int, ignore_index: int | None, per_image: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of a stratified sample of ``target``'s labelled pixels and the weight of each: every
    class present gets ``per_image // classes present`` pixels (all of them when it has fewer)."""
    flat = target.reshape(-1)
    valid = (flat < classes) if ignore_index is None else (flat != ignore_index) & (flat < classes)
    labelled = np.flatnonzero(valid)
    if len(labelled) <= per_image:
        return labelled, np.ones(len(labelled))
    present = np.unique(flat[labelled])
    quota = max(1, per_image // len(present))
    picks, weights = [], []
    for c in present:
        pixels = labelled[flat[labelled] == c]
        take = min(len(pixels), quota)
        picks.append(rng.choice(pixels, take, replace=False) if take < len(pixels) else pixels)
        weights.append(np.full(take, len(pixels) / take))
    return np.concatenate(picks), np.concatenate(weights)


def sample_oof(oof: OofRuns, per_image: int = 2048, seed: int = 0) -> OofSample:
    """One pass over ``oof``: the stratified pixel sample of every image (seeded per image id, so the
    sample does not depend on the order of the files)."""
    classes = oof.num_classes

    def one(key: str, fold: int, probs: ImageMaps, target: np.ndarray) -> tuple:
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        index, weight = sample_pixels(target, classes, oof.ignore_index, per_image, rng)
        stacked = np.stack([p.T for p in probs.pixels(index)], axis=1)  # [n, R, C], only these decoded
        return stacked.astype(np.float16), target.reshape(-1)[index].astype(np.int64), weight, fold

    parts = list(oof.map(one))  # each image's sample drawn on the reading threads
    if not parts:
        raise ValueError("no OOF images to sample")
    return OofSample(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
        np.concatenate([np.full(len(p[1]), p[3], np.int64) for p in parts]),
        classes,
    )


def _parts(sample: OofSample, fold: int, step: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(probs [P, R, C] float32, target [P], weight [P])`` of fold ``fold``'s pixels, ``step`` at a time."""
    rows = np.flatnonzero(sample.fold == fold)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        yield sample.probs[part].astype(np.float32), sample.target[part], sample.weight[part]


def _confusions(target: np.ndarray, pred: np.ndarray, weight: np.ndarray, classes: int) -> np.ndarray:
    """Weighted confusion counts of predictions ``[G, P]`` of ``G`` candidates, flat ``[G * C * C]``."""
    cell = (np.arange(len(pred)) * classes * classes)[:, None] + target[None, :] * classes + pred
    return np.bincount(cell.ravel(), np.broadcast_to(weight, pred.shape).ravel(), len(pred) * classes**2)


def vote_counts(sample: OofSample, weights: np.ndarray, chunk: int = 1 << 22) -> dict[int, np.ndarray]:
    """Per fold, the weighted confusion matrices ``[G, C, C]`` of the soft votes of ``weights`` (``[G, R]``
    per run, or ``[G, R, C]`` per run and class) on the sample, rounded to whole pixels. Pixels are scored
    in chunks of about ``chunk`` vote values, so memory stays bounded whatever the grid size."""
    w = np.asarray(weights, dtype=np.float32)
    grid, classes = len(w), sample.num_classes
    step = max(1, chunk // max(1, grid * classes))
    out: dict[int, np.ndarray] = {}
    for fold in sample.folds:
        counts = np.zeros(grid * classes * classes)
        for p, target, weight in _parts(sample, fold, step):
            if w.ndim == 2:  # where every run's argmax agrees, so does every convex combination's
                each = p.argmax(-1)
                agree = (each == each[:, :1]).all(1)
                same = np.bincount(target[agree] * classes + each[agree, 0], weight[agree], classes * classes)
                counts += np.tile(same, grid)
                p, target, weight = p[~agree], target[~agree], weight[~agree]
                votes = (w @ p.transpose(1, 0, 2).reshape(p.shape[1], -1)).reshape(grid, len(p), classes)
            else:
                votes = sum(w[:, r, None, :] * p[None, :, r, :] for r in range(p.shape[1]))
            counts += _confusions(target, votes.argmax(-1), weight, classes)
        out[fold] = np.rint(counts).astype(np.int64).reshape(grid, classes, classes)
    return out


def column_counts(
    sample: OofSample, base: np.ndarray, candidates: list[tuple[int, np.ndarray]], chunk: int = 1 << 22
) -> dict[int, np.ndarray]:
    """Per fold, confusion matrices ``[K, C, C]``: for candidate ``(c, column)``, the soft vote of the
    per-run-and-class weights ``base`` ``[R, C]`` with class ``c``'s column replaced by ``column`` (the
    per-class weight search). Only class ``c``'s score changes, so each candidate costs a comparison per
    pixel instead of a whole vote; ties go to the lower class index, as ``argmax`` breaks them."""
    base = np.asarray(base, np.float32)
    classes, size = sample.num_classes, len(candidates)
    which_class = np.array([c for c, _ in candidates])
    columns = np.stack([np.asarray(col, np.float32) for _, col in candidates])  # [K, R]
    step = max(1, chunk // max(1, size))
    out: dict[int, np.ndarray] = {}
    for fold in sample.folds:
        counts = np.zeros(size * classes * classes)
        for p, target, weight in _parts(sample, fold, step):
            scores = np.einsum("rc,prc->pc", base, p)
            pred = np.empty((size, len(p)), np.int64)
            for c in np.unique(which_class):
                rows = np.flatnonzero(which_class == c)
                others = scores.copy()
                others[:, c] = -np.inf
                best, which = others.max(1), others.argmax(1)
                alt = columns[rows] @ p[:, :, c].T  # [k, P]
                pred[rows] = np.where((alt > best) | ((alt == best) & (c < which)), c, which[None, :])
            counts += _confusions(target, pred, weight, classes)
        out[fold] = np.rint(counts).astype(np.int64).reshape(size, classes, classes)
    return out
