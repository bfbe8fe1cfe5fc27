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
    vote: Vote | None = None,
) -> dict[tuple[float, bool], np.ndarray]:
    """Confusion counts of ``pred`` after each ``(min_area, fill_holes)`` setting of class ``cls`` (as
    ``PostProcess`` applies them: small components removed, then holes filled). Empty when ``cls`` is absent
    (every setting leaves ``pred`` as it is). ``bins``: ``target_bins`` of ``target`` (made when not given).
    ``vote``: ``pred``'s ``Vote``, where the class's removal order and enclosed pixels are recorded.

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

    def filled(inside: np.ndarray, small: np.ndarray, after: np.ndarray) -> np.ndarray:
        """``after`` (the counts once ``small`` is removed) with the holes (flat pixels ``inside``) filled:
        their background pixels become ``cls``, and removed pixels in them are back to ``cls``."""
        b = bins[inside]
        back = small[labels.reshape(-1)[inside]]  # removed pixels inside the holes: filled back
        counts = moved(after, np.bincount(b[back], minlength=classes + 1)[:classes], 0, cls)
        return moved(counts, np.bincount(b[flat_pred[inside] == 0], minlength=classes + 1)[:classes], 0, cls)

    holes = enclosed(binary)
    has_holes = bool(holes.any())
    out: dict[tuple[float, bool], np.ndarray] = {}
    done: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # by the components removed
    removals = np.zeros(len(areas), np.uint8)  # per component: how many settings remove it
    inside_at: list[np.ndarray] = []  # per setting: the pixels its holes enclose
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
                done[key] = after, after, NOWHERE
            else:  # holes of what is left; a removed pixel filled back is unchanged
                left = enclosed(_without(binary, at[small[own]])) if removes else holes
                inside = np.flatnonzero(left)
                done[key] = after, filled(inside, small, after), inside.astype(np.int32)
        out[(area, False)], out[(area, True)], inside = done[key]
        inside_at.append(inside)
    if vote is not None:
        vote.record(cls, at, removals[own], inside_at)
    return out


NOWHERE = np.zeros(0, np.int32)  # no pixel


def _without(region: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """A copy of ``region`` with the flat ``pixels`` off."""
    out = region.copy()
    out.reshape(-1)[pixels] = False
    return out


class Vote:
    """One image's soft vote as the final scoring needs it, recorded by ``_outcomes`` while it counts the
    candidates: the class map, its confusion counts, each pixel's removal order (how many of the ``AREAS``
    remove its component) and, per class and setting, the pixels its holes enclose. One class's removal leaves
    the other classes' components as they were, and its holes depend on its own pixels alone, so any
    combination of tuned settings is applied from these without labelling or flooding again."""

    def __init__(self, pred: np.ndarray, plain: np.ndarray):
        self.pred, self.plain = pred, plain
        self.order = np.zeros(pred.shape, np.uint8)  # 0: no setting removes the pixel
        self.inside: dict[int, list[np.ndarray]] = {}

    def record(self, cls: int, at: np.ndarray, order: np.ndarray, inside: list[np.ndarray]) -> None:
        """Class ``cls``'s pixels ``at`` (flat) with their removal ``order``, and per setting its holes."""
        if order.any():
            self.order.reshape(-1)[at] = order
        self.inside[cls] = inside

    def close(self) -> None:
        """Once every class is recorded: keep of the enclosed pixels only those a fill can change (predicted
        background, or in a component some setting removes), so large enclosed regions cost no memory."""
        flat_pred, flat_order, kept = self.pred.reshape(-1), self.order.reshape(-1), {}
        for c, per_setting in self.inside.items():
            for inside in per_setting:
                if id(inside) not in kept:  # settings that remove the same components share their pixels
                    kept[id(inside)] = inside[(flat_pred[inside] == 0) | (flat_order[inside] > 0)]
            self.inside[c] = [kept[id(inside)] for inside in per_setting]

    def postprocessed(self, settings: PostProcess) -> np.ndarray:
        """``settings(pred)``: removals read from the order, then each class's holes filled in class order,
        as ``PostProcess`` does (computed afresh when a setting is not one of ``AREAS``)."""
        names = settings.class_names
        areas = [settings.min_area.get(name, 0.0) for name in names[1:]]
        if any(area not in AREAS for area in areas):
            return settings(self.pred)
        needed = np.full(len(names), 255, np.uint8)  # per class: the order that removes a pixel
        for c, area in enumerate(areas, start=1):
            needed[c] = len(AREAS) - AREAS.index(area) if area > 0 else 255
        mask = np.where(self.order >= needed[self.pred], 0, self.pred)
        flat = mask.reshape(-1)
        for c, (name, area) in enumerate(zip(names[1:], areas), start=1):
            if settings.fill_holes.get(name, False) and c in self.inside:
                inside = self.inside[c][AREAS.index(area)]
                flat[inside[flat[inside] == 0]] = c
        return mask


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
        # each image's Vote is kept (about two bytes a pixel) for the final scoring
        self.dtype, self.kept = np.min_scalar_type(oof.num_classes - 1), []

    def measure(self, key: str, fold: int, probs: ImageMaps, target: np.ndarray) -> tuple:
        """One image's ``Vote`` per weight vector and the counts of every candidate setting: reads nothing it
        changes."""
        classes, preds, counts = self.oof.num_classes, {}, []
        bins = target_bins(target, classes, self.oof.ignore_index)
        per_class = len(self.candidates) // max(1, classes - 1)
        for k in self.tables:
            pred = combine(probs.stored, self.votes[k]).astype(self.dtype)
            plain = confusion(pred, target, classes, self.oof.ignore_index, bins)
            preds[k] = Vote(pred, plain)
            for c in range(1, classes):
                outcomes = _outcomes(pred, target, c, plain, self.oof.ignore_index, bins, preds[k])
                counts += [(k, cand, outcomes.get(cand[1:], plain))
                           for cand in self.candidates[(c - 1) * per_class : c * per_class]]  # fmt: skip
            preds[k].close()
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

        def scored(kept: tuple) -> tuple[int, list[np.ndarray]]:  # on the reading threads, merged in order
            fold, target, preds = kept
            bins = target_bins(target, oof.num_classes, oof.ignore_index)

            def counted(pred: np.ndarray) -> np.ndarray:
                return confusion(pred, target, oof.num_classes, oof.ignore_index, bins)

            vote, own = preds[keys[None]], preds[keys[fold]]  # own: the vote of fold f's nested weights
            done = counted(vote.postprocessed(chosen))
            same = keys[fold] == keys[None] and per_fold[fold].operations == chosen.operations
            return fold, [vote.plain, done, done if same else counted(own.postprocessed(per_fold[fold]))]

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
    from ..predictions.voting import soft_scores, soft_vote

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
            scores = soft_scores(probs.stored, w)
            plain = soft_vote(probs.stored, w, scores)  # no CRF: the soft vote as evaluate makes it
            voted = scores / np.maximum(scores.sum(0, keepdims=True), 1e-12)
            table = counts.setdefault((wkey, fold), np.zeros((len(options), classes, classes), np.int64))
            for i, option in enumerate(options):
                pred = plain if option is None else dense_crf(image, voted, option).argmax(0)
                table[i] += confusion(pred, target, classes, ignore)
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
