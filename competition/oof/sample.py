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

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from ..core.io import read_ahead
from ..core.metrics import argmax_classes
from ..predictions.oof import ImageMaps, OofRuns, from_levels
from ..predictions.voting import whole_weights

CHUNK = 1 << 20  # vote values scored at a time: a chunk's [G, P] scores stay in the core's cache


@dataclass
class OofSample:
    """Sampled pixels of every image of some runs' OOF files, class-major, fold by fold (image order within a
    fold), and within a fold first the pixels where every run's argmax agrees (``agree``), then the others."""

    probs: np.ndarray  # [C, R, N]: each run's stored values there (uint8 levels p x 255, else float16)
    target: np.ndarray  # [N] int64: the label of each sampled pixel
    weight: np.ndarray  # [N] float64: how many pixels of its image and class each one stands for
    fold: np.ndarray  # [N] int64, sorted: the fold the pixel's image is out-of-fold in
    num_classes: int
    agree: np.ndarray  # [N] bool: every run's argmax is the same class there
    label: np.ndarray  # [N]: run 0's argmax class, everyone's where they agree
    workers: int = 1  # threads that score it (vote_counts, column_counts): those that read its runs

    def __post_init__(self) -> None:
        self.bounds: dict[int, tuple[int, int, int]] = {}  # fold -> (start, first disagreeing pixel, stop)
        for fold in np.unique(self.fold).tolist():
            start, stop = np.searchsorted(self.fold, [fold, fold + 1])
            self.bounds[int(fold)] = (int(start), int(start + self.agree[start:stop].sum()), int(stop))

    @property
    def folds(self) -> list[int]:
        return list(self.bounds)

    def parts(self, step: int, disagreeing: bool = False) -> list[tuple[int, slice]]:
        """``(fold, pixels)`` of every fold's pixels (``disagreeing``: only those where the runs' argmax
        differ), ``step`` at a time."""
        out = []
        for fold, (start, mid, stop) in self.bounds.items():
            first = mid if disagreeing else start
            out += [(fold, slice(a, min(stop, a + step))) for a in range(first, stop, step)]
        return out

    def agreed(self, fold: int) -> np.ndarray:
        """Weighted ``[C * C]`` counts of fold ``fold``'s pixels where every run's argmax agrees: those of
        any convex combination of the runs (each keeps that argmax)."""
        start, mid, _ = self.bounds[fold]
        cell = self.target[start:mid] * self.num_classes + self.label[start:mid]
        return np.bincount(cell, self.weight[start:mid], self.num_classes**2)

    def by_class(self, part: slice) -> np.ndarray:
        """``[C, R, P]`` float32 probabilities of the pixels ``part`` (levels decoded as ``oof.from_levels``
        decodes a map)."""
        stored = self.probs[:, :, part]
        return from_levels(stored) if stored.dtype == np.uint8 else stored.astype(np.float32)


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
        picked = probs.pixels(index)  # [C, n] per run, nothing else decompressed or decoded
        if any(p.dtype != np.uint8 for p in picked):  # float16 files (or a mix): as float16 probabilities
            picked = [_half(p) for p in picked]
        stacked = np.stack(picked, axis=1)  # [C, R, n]
        agree, label = _agreement(stacked)
        first = np.argsort(~agree, kind="stable")  # the pixels where every run agrees first, in order
        target = target.reshape(-1)[index].astype(np.int64)
        fields = (np.take(stacked, first, axis=2), target[first], weight[first], agree[first], label[first])
        return fold, int(agree.sum()), fields

    parts = list(oof.map(one))  # each image's sample (and where its runs agree) made on the reading threads
    if not parts:
        raise ValueError("no OOF images to sample")
    if len({fields[0].dtype for _, _, fields in parts}) > 1:  # levels and float16 files: all as float16
        parts = [(fold, agreed, (_half(fields[0]), *fields[1:])) for fold, agreed, fields in parts]
    pieces: list[tuple] = []  # fold by fold: every image's agreeing pixels, then every image's others
    for fold in sorted({fold for fold, _, _ in parts}):
        mine = [(agreed, fields) for f, agreed, fields in parts if f == fold]
        pieces += [tuple(a[..., :agreed] for a in fields) + (fold,) for agreed, fields in mine]
        pieces += [tuple(a[..., agreed:] for a in fields) + (fold,) for agreed, fields in mine]
    probs, target, weight, agree, label = (np.concatenate([p[i] for p in pieces], axis=-1) for i in range(5))
    fold = np.concatenate([np.full(len(p[1]), p[5], np.int64) for p in pieces])
    return OofSample(probs, target, weight, fold, classes, agree, label, oof.workers)


def _agreement(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where every run's argmax class of ``probs`` ``[C, R, N]`` is the same (levels keep each pixel's
    argmax), and run 0's class."""
    each = argmax_classes(probs)
    return (each == each[:1]).all(0), each[0].astype(np.min_scalar_type(len(probs) - 1))


def _half(stored: np.ndarray) -> np.ndarray:
    return (from_levels(stored) if stored.dtype == np.uint8 else stored).astype(np.float16)


def _confusions(target: np.ndarray, pred: np.ndarray, weight: np.ndarray, classes: int) -> np.ndarray:
    """Weighted confusion counts of predictions ``[G, P]`` of ``G`` candidates, flat ``[G * C * C]``."""
    cell = (np.arange(len(pred)) * classes * classes)[:, None] + target[None, :] * classes + pred
    return np.bincount(cell.ravel(), np.broadcast_to(weight, pred.shape).ravel(), len(pred) * classes**2)


def vote_counts(sample: OofSample, weights: np.ndarray, chunk: int = CHUNK) -> dict[int, np.ndarray]:
    """Per fold, the weighted confusion matrices ``[G, C, C]`` of the soft votes of ``weights`` (``[G, R]``
    per run, or ``[G, R, C]`` per run and class) on the sample, rounded to whole pixels. Pixels are scored
    in chunks of about ``chunk`` vote values (memory stays bounded whatever the grid size) on the sample's
    threads, merged in order (the counts of one thread). Stored levels with weights on a small denominator
    (a search's grid and picks) vote on exact integer sums, as ``voting.soft_vote`` votes them."""
    w = np.asarray(weights, dtype=np.float32)
    grid, classes = len(w), sample.num_classes
    whole = _whole_rows(np.asarray(weights, np.float64), classes) if sample.probs.dtype == np.uint8 else None

    def count(part: slice) -> np.ndarray:
        target, weight = sample.target[part], sample.weight[part]
        if whole is not None:
            return _confusions(target, _voted_levels(whole, sample.probs[:, :, part]), weight, classes)
        return _confusions(target, _voted(w, sample.by_class(part)), weight, classes)

    step = max(1, chunk // max(1, grid * classes))
    per_run = w.ndim == 2  # where every run's argmax agrees, so does every convex combination's: counted once
    counts = _per_fold(sample, sample.parts(step, disagreeing=per_run), count, grid)
    if per_run:
        for fold in counts:
            counts[fold] += np.tile(sample.agreed(fold), grid)
    return {f: np.rint(c).astype(np.int64).reshape(grid, classes, classes) for f, c in counts.items()}


def _voted(w: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``[G, P]`` arg-max class of the votes ``sum_r w[g, r(, c)] p[c, r]`` of class-major probabilities
    ``p`` ``[C, R, P]``, a class at a time (the first class of the largest vote, as ``argmax``)."""
    weights = (lambda c: w) if w.ndim == 2 else (lambda c: w[:, :, c])
    best = weights(0) @ p[0]
    index = np.zeros(best.shape, np.min_scalar_type(len(p) - 1))
    for c in range(1, len(p)):
        score = weights(c) @ p[c]
        np.putmask(index, score > best, c)
        np.maximum(best, score, out=best)
    return index


def _whole_rows(weights: np.ndarray, classes: int) -> np.ndarray | None:
    """Every candidate's weights ``[G, R(, C)]`` as whole numbers (``voting.whole_weights``, a scale per
    candidate), or ``None`` when one has none or its keys in ``_voted_levels`` would not be exact."""
    rows = [whole_weights(row) for row in weights]
    if any(row is None for row in rows):
        return None
    k = np.stack(rows)
    return k if classes * (255 * int(k.sum(1).max()) + 1) <= 2**24 else None


def _voted_levels(k: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``_voted`` of uint8 ``levels`` ``[C, R, P]`` with whole weights ``k`` ``[G, R(, C)]``: each class's
    vote is a whole number, so the key ``C * vote + (C - 1 - c)`` is exact in float32 and one running max per
    class picks the class of the largest vote, ties to the first (as ``argmax``, and as ``level_vote``)."""
    classes = len(levels)
    scaled = (k * classes).astype(np.float32)
    weights = (lambda c: scaled) if k.ndim == 2 else (lambda c: np.ascontiguousarray(scaled[:, :, c]))
    x = levels.astype(np.float32, order="C")  # each class's [R, P] rows contiguous, as BLAS takes them
    best = weights(0) @ x[0]
    best += classes - 1
    score = np.empty_like(best)
    for c in range(1, classes):
        np.matmul(weights(c), x[c], out=score)
        score += classes - 1 - c
        np.maximum(best, score, out=best)
    return (classes - 1 - best.astype(np.int32) % classes).astype(np.min_scalar_type(classes - 1))


def _per_fold(
    sample: OofSample, parts: list[tuple[int, slice]], count: Callable[[slice], np.ndarray], size: int
) -> dict[int, np.ndarray]:
    """``count(pixels)`` of every part (``OofSample.parts``) on the sample's threads, summed per fold in
    order: flat ``[size * C * C]`` per fold."""
    totals = {fold: np.zeros(size * sample.num_classes**2) for fold in sample.folds}
    threads = sample.workers  # the parts' small matrix products: BLAS threads of their own oversubscribe
    with threadpool_limits(1, user_api="blas") if threads > 1 else contextlib.nullcontext():
        for (fold, _), counts in zip(parts, read_ahead(count, [part for _, part in parts], threads)):
            totals[fold] += counts
    return totals


def column_counts(
    sample: OofSample,
    base: np.ndarray,
    candidates: list[tuple[int, np.ndarray]],
    chunk: int = CHUNK,
) -> dict[int, np.ndarray]:
    """Per fold, confusion matrices ``[K, C, C]``: for candidate ``(c, column)``, the soft vote of the
    per-run-and-class weights ``base`` ``[R, C]`` with class ``c``'s column replaced by ``column`` (the
    per-class weight search). Only class ``c``'s score changes, so each candidate costs a comparison per
    pixel against the best other class (the top score, or the second where the top is ``c``) instead of a
    whole vote; ties go to the lower class index, as ``argmax`` breaks them."""
    base = np.asarray(base, np.float32)
    classes, size = sample.num_classes, len(candidates)
    which_class = np.array([c for c, _ in candidates])
    columns = np.stack([np.asarray(col, np.float32) for _, col in candidates])  # [K, R]

    def count(part: slice) -> np.ndarray:
        p, target, weight = sample.by_class(part), sample.target[part], sample.weight[part]
        scores = np.stack([base[:, c] @ p[c] for c in range(classes)])  # [C, P]
        pixels = np.arange(scores.shape[1])
        first = argmax_classes(scores)
        top = scores[first, pixels]
        scores[first, pixels] = -np.inf
        second = argmax_classes(scores)
        runner_up = scores[second, pixels]
        pred = np.empty((size, len(pixels)), np.int64)
        for c in np.unique(which_class):
            rows = np.flatnonzero(which_class == c)
            is_top = first == c  # the best other class: the runner-up where c is on top
            best, which = np.where(is_top, runner_up, top), np.where(is_top, second, first)
            alt = columns[rows] @ p[c]  # [k, P]
            pred[rows] = np.where((alt > best) | ((alt == best) & (c < which)), c, which[None, :])
        return _confusions(target, pred, weight, classes)

    counts = _per_fold(sample, sample.parts(max(1, chunk // max(1, size))), count, size)
    return {f: np.rint(c).astype(np.int64).reshape(size, classes, classes) for f, c in counts.items()}
