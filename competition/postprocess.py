"""Post-processing of class-index masks, tuned on out-of-fold predictions.

Per foreground class, two operations (both off by default):

- ``min_area``: connected components (8-connected) of the class smaller than this fraction of the image area
  become background. A fraction, not pixels, so a setting tuned on OOF maps of one size holds at another.
- ``fill_holes``: background pixels enclosed by the class become the class (other classes inside stay).

``tune`` chooses each class's setting on OOF predictions (the other classes left as predicted), reports the
in-sample score and a nested one (each fold post-processed with the settings chosen on the other folds), and
``PostProcess`` is saved as ``postprocess.json``, which ``predict`` and ``ensemble`` apply with
``--postprocess FILE`` after checking it was tuned for the same classes. It may also hold a dense-CRF
setting (``crf``, tuned by ``competition.crf.tune_crf``), applied to the probabilities before the arg-max and
the mask operations; only ``predict`` has the images CRF needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import provenance
from .io import atomic_write_text
from .metrics import confusion
from .oof import OofRuns
from .tuning import FoldTable, nested_folds
from .voting import combine

AREAS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # candidate min_area fractions, "off" first


def remove_small(mask: np.ndarray, cls: int, min_pixels: int, fill: int = 0) -> np.ndarray:
    """``mask`` with the 8-connected components of ``cls`` smaller than ``min_pixels`` set to ``fill``."""
    binary = (mask == cls).astype(np.uint8)
    if min_pixels <= 1 or not binary.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_pixels)
    small = small[small > 0]  # label 0 is everything that is not the class
    if not len(small):
        return mask
    out = mask.copy()
    out[np.isin(labels, small)] = fill
    return out


def enclosed(region: np.ndarray) -> np.ndarray:
    """Pixels outside ``region`` that no 4-connected path outside it joins to the image border: the
    pixels ``scipy.ndimage.binary_fill_holes`` adds, from one connected-components call."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~region).astype(np.uint8), connectivity=4)
    height, width = region.shape
    x, y, w, h = (
        stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT)
    )
    inner = (x > 0) & (y > 0) & (x + w < width) & (y + h < height)
    inner[0] = False  # label 0 is the region itself
    return inner[labels]


def fill_holes(mask: np.ndarray, cls: int, background: int = 0) -> np.ndarray:
    """``mask`` with background pixels fully enclosed by ``cls`` set to ``cls``."""
    region = mask == cls
    if not region.any():
        return mask
    holes = enclosed(region) & (mask == background)
    if not holes.any():
        return mask
    out = mask.copy()
    out[holes] = cls
    return out


@dataclass
class PostProcess:
    """Per-class settings (by class name); classes not listed are left alone."""

    class_names: list[str]
    min_area: dict[str, float] = field(default_factory=dict)
    fill_holes: dict[str, bool] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # the runs and weights it was tuned on
    crf: dict[str, float] | None = None  # competition.crf.CrfSettings, applied before the arg-max

    def __post_init__(self) -> None:
        if self.crf is not None:
            from .crf import CrfSettings

            CrfSettings.from_dict(self.crf)  # checked when read, not at the first image
        unknown = sorted((set(self.min_area) | set(self.fill_holes)) - set(self.class_names[1:]))
        if unknown:
            raise ValueError(f"post-processing names classes {unknown} not in {self.class_names[1:]}")
        bad = {k: v for k, v in self.min_area.items() if not 0 <= v < 1}
        if bad:
            raise ValueError(f"min_area is a fraction of the image area in [0, 1), got {bad}")

    @property
    def changes_masks(self) -> bool:
        """Whether any mask operation is set (they turn pixels into background, class 0)."""
        return any(self.min_area.values()) or any(self.fill_holes.values())

    def refine(self, probs: np.ndarray, image: np.ndarray) -> np.ndarray:
        """``probs`` ``[C, H, W]`` after the dense CRF this file sets (unchanged without one)."""
        if self.crf is None:
            return probs
        from .crf import CrfSettings, dense_crf

        return dense_crf(image, probs, CrfSettings.from_dict(self.crf))

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        area = mask.shape[0] * mask.shape[1]
        for c, name in enumerate(self.class_names[1:], start=1):
            if self.min_area.get(name, 0.0) > 0:
                mask = remove_small(mask, c, int(round(self.min_area[name] * area)))
        for c, name in enumerate(self.class_names[1:], start=1):
            if self.fill_holes.get(name, False):
                mask = fill_holes(mask, c)
        return mask

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        return atomic_write_text(path, json.dumps(asdict(self), indent=2), overwrite)

    @classmethod
    def load(
        cls, path: str | os.PathLike, class_names: Sequence[str], background: int | None = 0
    ) -> PostProcess:
        """Read ``postprocess.json``; it must have been tuned for exactly ``class_names``, and its mask
        operations (which make pixels background) need predictions with a ``background`` class."""
        try:
            raw = json.loads(Path(path).read_text())
            pp = cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"cannot read post-processing file {path}: {exc}") from exc
        if list(pp.class_names) != list(class_names):
            raise ValueError(
                f"{path} was tuned for classes {pp.class_names}, but these predictions have "
                f"{list(class_names)}"
            )
        if pp.changes_masks and background != 0:
            raise ValueError(f"{path}: its mask operations need a background class; these runs have none")
        return pp


def _candidates(classes: int) -> list[tuple[int, float, bool]]:
    """``(class, min_area, fill_holes)`` per class, ``(c, 0, False)`` (off) first."""
    return [(c, a, h) for c in range(1, classes) for h in (False, True) for a in AREAS]


def _outcomes(
    pred: np.ndarray, target: np.ndarray, cls: int, plain: np.ndarray, ignore_index: int | None
) -> dict[tuple[float, bool], np.ndarray]:
    """Confusion counts of ``pred`` after each ``(min_area, fill_holes)`` setting of class ``cls`` (as
    ``PostProcess`` applies them: small components removed, then holes filled). Components are found once;
    each setting's counts are ``plain``'s corrected on the pixels it changes. Empty when ``cls`` is absent
    (every setting leaves ``pred`` as it is)."""
    binary = pred == cls
    if not binary.any():
        return {}
    classes = len(plain)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    out: dict[tuple[float, bool], np.ndarray] = {}
    done: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}  # by the components removed

    def corrected(after: np.ndarray) -> np.ndarray:
        changed = after != pred
        if not changed.any():
            return plain
        t = target[changed]
        return (
            plain
            - confusion(pred[changed], t, classes, ignore_index)
            + confusion(after[changed], t, classes, ignore_index)
        )

    for area in AREAS:
        min_pixels = int(round(area * pred.size))
        small = stats[:, cv2.CC_STAT_AREA] < min_pixels if min_pixels > 1 else np.zeros(count, bool)
        small[0] = False  # label 0 is everything that is not the class
        key = tuple(np.flatnonzero(small))
        if key not in done:
            removed = small[labels]
            after = np.where(removed, 0, pred).astype(pred.dtype)
            filled = np.where(enclosed(binary & ~removed) & (after == 0), cls, after).astype(pred.dtype)
            done[key] = corrected(after), corrected(filled)
        out[(area, False)], out[(area, True)] = done[key]
    return out


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
    runs: Sequence[str | os.PathLike],
    weights: np.ndarray | Sequence[float] | None = None,
    fold_weights: Mapping[int, np.ndarray] | None = None,
    allow_partial: bool = False,
) -> Tuned:
    """Choose each class's post-processing on the OOF predictions of ``runs`` (soft vote with ``weights``).

    ``fold_weights``: when ``weights`` were themselves chosen on the OOF predictions, the weights chosen
    without each fold (``ensemble.WeightSearch.fold_weights``). The nested score then post-processes fold f
    with settings tuned, on the other folds, on the vote of fold f's weights: neither choice saw fold f.
    """
    oof = OofRuns(runs, allow_partial)
    tuner = Tuner(oof, weights, fold_weights)
    for item in oof:
        tuner.add(*item)
    return tuner.result()


class Tuner:
    """``tune`` image by image, so that one pass over the OOF files can feed it and other consumers
    (``evaluate --tune-postprocess`` scores the OOF table in the same pass): ``add`` every image of
    ``oof``, then ``result``."""

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
        # each image's votes are kept (one byte a pixel) for the final scoring of the choices
        self.dtype, self.kept = np.min_scalar_type(oof.num_classes - 1), []

    def add(self, key: str, fold: int, probs: list[np.ndarray], target: np.ndarray) -> None:
        classes, preds = self.oof.num_classes, {}
        per_class = len(self.candidates) // max(1, classes - 1)
        for k, table in self.tables.items():
            pred = preds[k] = combine(probs, self.votes[k]).astype(self.dtype)
            plain = confusion(pred, target, classes, self.oof.ignore_index)
            for c in range(1, classes):
                outcomes = _outcomes(pred, target, c, plain, self.oof.ignore_index)
                for cand in self.candidates[(c - 1) * per_class : c * per_class]:
                    table.add_counts(fold, cand, outcomes.get(cand[1:], plain))
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
        for fold, target, preds in self.kept:
            pred = preds[keys[None]]
            final.add(fold, "plain", pred, target)
            final.add(fold, "in", chosen(pred), target)
            final.add(fold, "nested", per_fold[fold](preds[keys[fold]]), target)
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
