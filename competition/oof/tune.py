"""Choosing post-processing on out-of-fold predictions, with an honest score: per-class mask operations
(``tune`` / ``Tuner``, for ``predictions.postprocess.PostProcess``) and a dense-CRF setting (``tune_crf``, for
``predictions.crf``). Each reports the in-sample score and a nested one (fold f scored with what was chosen on
the other folds); when the ensemble weights were themselves chosen on the OOF predictions, the nested score
uses the weights chosen without fold f too."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from ..core.io import read_ahead
from ..core.metrics import confusion, miou_of, target_bins
from ..predictions import provenance
from ..predictions.crf import CrfSettings, dense_crf
from ..predictions.oof import ImageMaps, OofRuns, opened
from ..predictions.postprocess import PostProcess, component_labels, enclosed
from ..predictions.voting import combine
from .nested import FoldTable, nested_folds

AREAS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # candidate min_area fractions, "off" first


def _candidates(classes: int) -> list[tuple[int, float, bool]]:
    """``(class, min_area, fill_holes)`` per class, ``(c, 0, False)`` (off) first."""
    return [(c, a, h) for c in range(1, classes) for h in (False, True) for a in AREAS]


def _outcomes(
    pred: np.ndarray,
    target: np.ndarray,
    cls: int,
    plain: np.ndarray,
    ignore_index: int | None,
    bins: np.ndarray | None = None,
    order: np.ndarray | None = None,
) -> dict[tuple[float, bool], np.ndarray]:
    """Confusion counts of ``pred`` after each ``(min_area, fill_holes)`` setting of class ``cls`` (as
    ``PostProcess`` applies them: small components removed, then holes filled). Empty when ``cls`` is absent
    (every setting leaves ``pred`` as it is). ``bins``: ``target_bins`` of ``target`` (made when not given).
    ``order`` (uint8, ``pred``'s shape, 0 on ``cls``): set on ``cls``'s pixels to how many of the ``AREAS``
    remove their component (``_removed`` reads it back).

    Each setting's counts are ``plain``'s with the pixels it changes moved between two predicted classes:
    removed pixels from ``cls`` to background, filled holes from background to ``cls``. One pass finds the
    components and counts each one's target classes, so a removal costs no pass over the image; hole filling
    floods the outside once per distinct removal (none when the class has no hole: then every removed piece
    touches the outside, and filling changes nothing)."""
    binary = pred == cls
    at = np.flatnonzero(binary)  # the class's pixels (a few percent of the image): counted alone
    if not at.size:
        return {}
    classes = len(plain)
    bins = target_bins(target, classes, ignore_index) if bins is None else bins
    labels = component_labels(binary, as_index=False)  # read at the class's (and the holes') pixels only
    own = labels.reshape(-1)[at].astype(np.intp)  # each class pixel's component
    index = own * (classes + 1)
    index += bins[at]
    per_label = np.bincount(index, minlength=(own.max() + 1) * (classes + 1)).reshape(-1, classes + 1)
    areas, per_label = per_label.sum(1), per_label[:, :classes]  # pixels; counted target classes
    flat_pred = pred.reshape(-1)

    def moved(counts: np.ndarray, n: np.ndarray, old: int, new: int) -> np.ndarray:
        """``counts`` with ``n`` pixels (per target class) changed from prediction ``old`` to ``new``."""
        if not n.any():
            return counts
        counts = counts.copy()
        counts[:, old] -= n
        counts[:, new] += n
        return counts

    def filled(hole: np.ndarray, small: np.ndarray, after: np.ndarray) -> np.ndarray:
        """``after`` (the counts once ``small`` is removed) with the holes ``hole`` filled: its background
        pixels become ``cls``, and removed pixels in it are back to ``cls``."""
        inside = np.flatnonzero(hole)
        b = bins[inside]
        back = small[labels.reshape(-1)[inside]]  # removed pixels inside the holes: filled back
        counts = moved(after, np.bincount(b[back], minlength=classes + 1)[:classes], 0, cls)
        return moved(counts, np.bincount(b[flat_pred[inside] == 0], minlength=classes + 1)[:classes], 0, cls)

    holes = enclosed(binary)
    has_holes = bool(holes.any())
    out: dict[tuple[float, bool], np.ndarray] = {}
    done: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # by the components removed
    removals = np.zeros(len(areas), np.uint8)  # per component: how many settings remove it
    for area in AREAS:
        min_pixels = int(round(area * pred.size))
        small = areas < min_pixels if min_pixels > 1 else np.zeros(len(areas), bool)
        small[0] = False  # label 0 is everything that is not the class
        removals += small
        key = small.tobytes()
        if key not in done:
            removes = small.any()
            after = moved(plain, per_label[small].sum(0), cls, 0) if removes else plain
            if not has_holes:
                done[key] = after, after
            else:  # holes of what is left; a removed pixel filled back is unchanged
                left = enclosed(_without(binary, at[small[own]])) if removes else holes
                done[key] = after, filled(left, small, after)
        out[(area, False)], out[(area, True)] = done[key]
    if order is not None and removals.any():
        order.reshape(-1)[at] = removals[own]
    return out


def _without(region: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """A copy of ``region`` with the flat ``pixels`` off."""
    out = region.copy()
    out.reshape(-1)[pixels] = False
    return out


def _removed(pred: np.ndarray, order: np.ndarray, settings: PostProcess) -> np.ndarray | None:
    """Where ``settings``' small-component removals change ``pred``, from the ``order`` its tuning recorded
    (``_outcomes``): one class's removal leaves the other classes' components as they were, so each pixel's
    own class decides. ``None`` when a setting is not one of ``AREAS`` (then nothing was recorded for it)."""
    needed = np.full(len(settings.class_names), 255, np.uint8)  # per class: removals that remove a pixel
    for c, name in enumerate(settings.class_names[1:], start=1):
        area = settings.min_area.get(name, 0.0)
        if area not in AREAS:
            return None
        needed[c] = len(AREAS) - AREAS.index(area) if area > 0 else 255
    return order >= needed[pred]


@dataclass
class Tuned:
    """Result of ``tune``: the settings chosen on every fold, those chosen without each fold, and the scores
    of plain argmax, in-sample and nested post-processing."""

    postprocess: PostProcess
    fold_postprocess: dict[int, PostProcess]
    baseline: float
    in_sample: float
    nested: float


def tune(
    runs: Sequence[str | os.PathLike] | OofRuns,
    weights: np.ndarray | Sequence[float] | None = None,
    fold_weights: Mapping[int, np.ndarray] | None = None,
    allow_partial: bool = False,
) -> Tuned:
    """Choose each class's post-processing on the OOF predictions of ``runs`` (soft vote with ``weights``).

    ``fold_weights``: when ``weights`` were themselves chosen on the OOF predictions, the weights chosen
    without each fold (``ensemble.WeightSearch.fold_weights``). The nested score then post-processes fold f
    with settings tuned, on the other folds, on the vote of fold f's weights: neither choice saw fold f.
    """
    oof = opened(runs, allow_partial)
    tuner = Tuner(oof, weights, fold_weights)
    oof.feed(tuner)
    return tuner.result()


class Tuner:
    """``tune`` image by image, so that one pass over the OOF files can feed it and other consumers
    (``evaluate --tune-postprocess`` scores the OOF table in the same pass): ``oof.feed(tuner, ...)``, then
    ``result``."""

    def __init__(
        self,
        oof: OofRuns,
        weights: np.ndarray | Sequence[float] | None = None,
        fold_weights: Mapping[int, np.ndarray] | None = None,
    ):
        if oof.background != 0:
            raise ValueError(
                "post-processing turns removed regions into background (class 0), but these runs have no "
                "background class (data.background: none): leave out --tune-postprocess"
            )
        self.oof, self.weights, self.nested_weights = oof, weights, fold_weights is not None
        self.candidates = _candidates(oof.num_classes)
        self.folds = nested_folds(oof)
        self.bases = {None: weights} | {f: (fold_weights or {}).get(f, weights) for f in self.folds}
        # one candidate table per distinct weight vector; base f's choice leaves fold f out of it
        self.keys = {b: _weights_key(w) for b, w in self.bases.items()}
        self.tables = {k: FoldTable(oof.num_classes, oof.ignore_index) for k in set(self.keys.values())}
        self.votes = {k: self.bases[next(b for b in self.bases if self.keys[b] == k)] for k in self.tables}
        # each image's votes, removal order and counts are kept (two bytes a pixel) for the final scoring
        self.dtype, self.kept = np.min_scalar_type(oof.num_classes - 1), []

    def measure(self, key: str, fold: int, probs: ImageMaps, target: np.ndarray) -> tuple:
        """One image's votes (with their removal order, see ``_outcomes``, and their counts) and the counts of
        every candidate setting: reads nothing it changes."""
        classes, preds, counts = self.oof.num_classes, {}, []
        bins = target_bins(target, classes, self.oof.ignore_index)
        per_class = len(self.candidates) // max(1, classes - 1)
        for k in self.tables:
            pred = combine(probs.stored, self.votes[k]).astype(self.dtype)
            order = np.zeros(pred.shape, np.uint8)
            plain = confusion(pred, target, classes, self.oof.ignore_index, bins)
            preds[k] = pred, order, plain
            for c in range(1, classes):
                outcomes = _outcomes(pred, target, c, plain, self.oof.ignore_index, bins, order)
                counts += [(k, cand, outcomes.get(cand[1:], plain))
                           for cand in self.candidates[(c - 1) * per_class : c * per_class]]  # fmt: skip
        return fold, counts, target, preds

    def merge(self, part: tuple) -> None:
        fold, counts, target, preds = part
        for k, cand, matrix in counts:
            self.tables[k].add_counts(fold, cand, matrix)
        self.kept.append((fold, target, preds))

    def _choose(self, without: int | None) -> PostProcess:
        names = self.oof.class_names
        pp = PostProcess(names)
        for c in range(1, len(names)):
            options = [cand for cand in self.candidates if cand[0] == c]
            _, area, holes = self.tables[self.keys[without]].best(options, without)
            if area > 0:
                pp.min_area[names[c]] = area
            if holes:
                pp.fill_holes[names[c]] = True
        return pp

    def result(self) -> Tuned:
        oof, keys = self.oof, self.keys
        chosen, per_fold = self._choose(None), {f: self._choose(f) for f in self.folds}
        final = FoldTable(oof.num_classes, oof.ignore_index)

        def applied(settings: PostProcess, vote: tuple) -> np.ndarray:
            """``settings(pred)`` of a kept ``(pred, order, counts)``, its removals read from ``order``
            instead of labelling every class again."""
            pred, order, _ = vote
            removed = _removed(pred, order, settings)
            return settings(pred) if removed is None else settings.fill(np.where(removed, 0, pred))

        def scored(kept: tuple) -> tuple[int, list[np.ndarray]]:  # on the reading threads, merged in order
            fold, target, preds = kept
            bins = target_bins(target, oof.num_classes, oof.ignore_index)

            def counted(pred: np.ndarray) -> np.ndarray:
                return confusion(pred, target, oof.num_classes, oof.ignore_index, bins)

            plain, done = preds[keys[None]][2], counted(applied(chosen, preds[keys[None]]))
            same = keys[fold] == keys[None] and per_fold[fold].operations == chosen.operations
            return fold, [plain, done, done if same else counted(applied(per_fold[fold], preds[keys[fold]]))]

        for fold, counts in read_ahead(scored, self.kept, oof.workers):
            for name, matrix in zip(("plain", "in", "nested"), counts):
                final.add_counts(fold, name, matrix)
        scores = {name: final.miou(name) for name in ("plain", "in", "nested")}
        chosen.scores = {"oof_miou_plain": scores["plain"], "oof_miou_in_sample": scores["in"]}
        chosen.scores["oof_miou_nested"] = scores["nested"]
        w = None if self.weights is None else np.asarray(self.weights).tolist()
        chosen.provenance = provenance.record(
            "postprocess",
            oof.infos,
            oof.class_names,
            weights=w,
            nested_weights=self.nested_weights,
            partial=oof.partial,
        )
        return Tuned(chosen, per_fold, scores["plain"], scores["in"], scores["nested"])


def _weights_key(weights: Any) -> Hashable:
    return None if weights is None else tuple(np.asarray(weights, dtype=np.float64).ravel().round(12))


# what tune_crf tries besides "no CRF": the spatial reach and colour tolerance of the bilateral kernel
CRF_CANDIDATES = tuple(
    CrfSettings(bilateral_sxy=sxy, bilateral_srgb=srgb, bilateral_compat=compat)
    for sxy in (0.05, 0.15)
    for srgb in (5.0, 13.0)
    for compat in (4.0, 10.0)
)


@dataclass
class CrfTuned:
    """``tune_crf``'s result: the setting chosen on every fold (``None``: CRF does not help), the settings
    chosen without each fold, OOF mIoU plain / in-sample / nested, and per fold ``(plain, nested)`` mIoU
    (the spread of the nested gain over folds)."""

    settings: CrfSettings | None
    fold_settings: dict[int, CrfSettings | None]
    baseline: float
    in_sample: float
    nested: float
    table: list[dict[str, Any]]
    fold_scores: dict[int, tuple[float, float]]


def tune_crf(
    oof: Any,
    files: Mapping[str, str],
    image_root: str | os.PathLike,
    weights: Sequence[float] | np.ndarray | None = None,
    candidates: Sequence[CrfSettings] = CRF_CANDIDATES,
    progress: bool = True,
    fold_weights: Mapping[int, np.ndarray] | None = None,
) -> CrfTuned:
    """Choose a dense-CRF setting (or none) on the OOF predictions of ``oof`` (an ``OofRuns``; the images
    under ``image_root``), soft vote with ``weights``. Every candidate runs on every image once per distinct
    weight vector; counts are kept per fold, so the nested choices cost nothing more. ``files``: OOF key
    (image id) -> file name under ``image_root`` (``data.splits.data_files``), checked against the file names
    the OOF files record. With one fold the nested score is NaN.

    ``fold_weights``: when ``weights`` were themselves chosen on the OOF predictions, the weights chosen
    without each fold (``ensemble.WeightSearch.fold_weights``). Fold f's nested score then votes with the
    weights chosen without f and the CRF setting chosen, with those weights, on the other folds: nothing in
    it was chosen on fold f (as ``postprocess.Tuner`` does for post-processing)."""
    from ..data.coco import safe_join
    from ..data.images import read_image
    from ..predictions.voting import soft_scores

    oof.check_files(files, "the runs' data")  # dense CRF reads each OOF image: the very same file
    options: list[CrfSettings | None] = [None, *candidates]
    classes, ignore = oof.num_classes, oof.ignore_index
    bases = {None: weights} | {f: (fold_weights or {}).get(f, weights) for f in oof.folds}
    keys = {b: _weights_key(w) for b, w in bases.items()}
    votes = {keys[b]: bases[b] for b in bases}  # one vote (and CRF run) per distinct weight vector
    counts: dict[tuple[Any, int], np.ndarray] = {}  # (weights key, fold) -> [option, classes, classes]
    for key, fold, probs, target in tqdm(oof, total=len(oof), desc="crf", unit="img", disable=not progress):
        image = read_image(safe_join(image_root, files[key]))
        for wkey, w in votes.items():
            voted = soft_scores(probs.stored, w)
            voted = voted / np.maximum(voted.sum(0, keepdims=True), 1e-12)
            table = counts.setdefault((wkey, fold), np.zeros((len(options), classes, classes), np.int64))
            for i, option in enumerate(options):
                refined = voted if option is None else dense_crf(image, voted, option)
                table[i] += confusion(refined.argmax(0), target, classes, ignore)
    folds = sorted({f for _, f in counts})

    def pooled(base: int | None) -> np.ndarray:
        return sum(c for (k, f), c in counts.items() if k == keys[base] and f != base)

    def choose(without: int | None) -> int:  # ties: no CRF first
        return int(np.argmax([miou_of(pooled(without)[i]) for i in range(len(options))]))

    total = pooled(None)
    scores = [miou_of(total[i]) for i in range(len(options))]
    best, nested_folds = choose(None), folds if len(folds) > 1 else []
    chosen = {f: choose(f) for f in nested_folds}
    nested = miou_of(sum(counts[(keys[f], f)][chosen[f]] for f in folds)) if nested_folds else float("nan")
    table = [{"setting": "none" if o is None else asdict(o), "oof_miou": s} for o, s in zip(options, scores)]
    plain = {f: miou_of(counts[(keys[None], f)][0]) for f in chosen}
    per_fold = {f: (plain[f], miou_of(counts[(keys[f], f)][c])) for f, c in chosen.items()}
    return CrfTuned(
        options[best], {f: options[chosen[f]] for f in nested_folds}, scores[0], scores[best], nested, table,
        per_fold,
    )  # fmt: skip
