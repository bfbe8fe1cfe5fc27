"""Dense CRF (Krähenbühl & Koltun, 2011) on a model's class probabilities, with ``pydensecrf2``.

A fully connected CRF whose unary term is ``-log p`` of the model and whose pairwise terms pull pixels that
are close (Gaussian kernel, ``gaussian_sxy``) and close and alike in colour (bilateral kernel,
``bilateral_sxy``, ``bilateral_srgb``) towards one label; ``*_compat`` weighs each kernel. Spatial widths
are fractions of the map's longer side, not pixels, so a setting tuned on OOF maps of one size holds at
another (as ``postprocess.min_area`` is a fraction of the area); colour widths are in 0-255 levels.

``oof.tune.tune_crf`` chooses a setting (or none) on OOF predictions with a nested score: fold f is scored
with the setting chosen on the other folds, so the score that says whether CRF helps was not chosen on what it
scores. The choice is saved in ``postprocess.json`` (``PostProcess.crf``), which ``predict --postprocess``
applies to each image's probabilities before the arg-max.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

__all__ = ["CrfSettings", "dense_crf", "densecrf_module"]


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
