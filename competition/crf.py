"""Dense CRF (Krähenbühl & Koltun, 2011) on a model's class probabilities, with ``pydensecrf2``.

A fully connected CRF whose unary term is ``-log p`` of the model and whose pairwise terms pull pixels that
are close (Gaussian kernel, ``gaussian_sxy``) and close and alike in colour (bilateral kernel,
``bilateral_sxy``, ``bilateral_srgb``) towards one label; ``*_compat`` weighs each kernel. Spatial widths
are fractions of the map's longer side, not pixels, so a setting tuned on OOF maps of one size holds at
another (as ``postprocess.min_area`` is a fraction of the area); colour widths are in 0-255 levels.

``tune_crf`` chooses a setting (or none) on OOF predictions with a nested score: fold f is scored with the
setting chosen on the other folds, so the score that says whether CRF helps was not chosen on what it scores.
The choice is saved in ``postprocess.json`` (``PostProcess.crf``), which ``predict --postprocess`` applies
to each image's probabilities before the arg-max.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from .metrics import confusion, miou_of

__all__ = ["CrfSettings", "dense_crf", "CRF_CANDIDATES", "CrfTuned", "tune_crf"]


@dataclass(frozen=True)
class CrfSettings:
    """One dense-CRF setting; the defaults are pydensecrf's example values (3 px, 80 px, 13 levels) on a
    500 px side."""

    iterations: int = 5
    gaussian_sxy: float = 0.006
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 0.16
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0

    def __post_init__(self) -> None:
        values = asdict(self)
        bad = {k: v for k, v in values.items() if not v > 0}
        if bad or self.gaussian_sxy >= 1 or self.bilateral_sxy >= 1:
            raise ValueError(
                f"CRF settings must be positive, spatial widths fractions of the longer side (< 1): {values}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CrfSettings:
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown CRF settings {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**raw)


# what tune_crf tries besides "no CRF": the spatial reach and colour tolerance of the bilateral kernel
CRF_CANDIDATES = tuple(
    CrfSettings(bilateral_sxy=sxy, bilateral_srgb=srgb, bilateral_compat=compat)
    for sxy in (0.05, 0.15)
    for srgb in (5.0, 13.0)
    for compat in (4.0, 10.0)
)


def densecrf_module() -> Any:
    """pydensecrf's ``densecrf`` module; an ``ImportError`` saying how to install it when it is missing."""
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as exc:
        raise ImportError(
            "dense CRF needs pydensecrf2: pip install \"smp-unet3p[crf]\" (or pydensecrf2)"
        ) from exc
    return densecrf


def dense_crf(image: np.ndarray, probs: np.ndarray, settings: CrfSettings) -> np.ndarray:
    """Refined probabilities ``[C, H, W]`` float32 of ``probs`` (``[C, H, W]``, summing to 1 per pixel) on
    ``image`` (``[H, W, 3]`` uint8 RGB; resized to the map when its size differs)."""
    classes, height, width = probs.shape
    if classes < 2:
        raise ValueError("dense CRF needs at least two class channels (softmax probabilities)")
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    side = max(height, width)
    crf = densecrf_module().DenseCRF2D(width, height, classes)
    unary = -np.log(np.clip(probs.reshape(classes, -1), 1e-6, 1.0)).astype(np.float32)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy * side, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=settings.bilateral_sxy * side,
        srgb=settings.bilateral_srgb,
        rgbim=np.ascontiguousarray(image[..., :3], dtype=np.uint8),
        compat=settings.bilateral_compat,
    )
    q = crf.inference(settings.iterations)
    return np.asarray(q, dtype=np.float32).reshape(classes, height, width)


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
    from .data.coco import safe_join
    from .data.images import read_image
    from .voting import soft_scores

    oof.check_files(files, "the runs' data")  # dense CRF reads each OOF image: the very same file
    options: list[CrfSettings | None] = [None, *candidates]
    classes, ignore = oof.num_classes, oof.ignore_index
    bases = {None: weights} | {f: (fold_weights or {}).get(f, weights) for f in oof.folds}
    keys = {b: None if w is None else tuple(np.ravel(w).round(12)) for b, w in bases.items()}
    votes = {keys[b]: bases[b] for b in bases}  # one vote (and CRF run) per distinct weight vector
    counts: dict[tuple[Any, int], np.ndarray] = {}  # (weights key, fold) -> [option, classes, classes]
    for key, fold, probs, target in tqdm(oof, total=len(oof), desc="crf", unit="img", disable=not progress):
        image = read_image(safe_join(image_root, files[key]))
        for wkey, w in votes.items():
            voted = soft_scores(probs, w)
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
