"""Post-processing of class-index masks, tuned on out-of-fold predictions.

Per foreground class, two operations (both off by default):

- ``min_area``: connected components (8-connected) of the class smaller than this fraction of the image area
  become background. A fraction, not pixels, so a setting tuned on OOF maps of one size holds at another.
- ``fill_holes``: background pixels enclosed by the class become the class (other classes inside stay).

``oof.tune.tune`` chooses each class's setting on OOF predictions (the other classes left as predicted),
reports the in-sample score and a nested one (each fold post-processed with the settings chosen on the other
folds), and ``PostProcess`` is saved as ``postprocess.json``, which ``predict`` and ``ensemble`` apply with
``--postprocess FILE`` after checking it was tuned for the same classes. It may also hold a dense-CRF
setting (``crf``, tuned by ``oof.tune.tune_crf``), applied to the probabilities before the arg-max and
the mask operations; only ``predict`` has the images CRF needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..core.io import atomic_write_text


def remove_small(mask: np.ndarray, cls: int, min_pixels: int, fill: int = 0) -> np.ndarray:
    """``mask`` with the 8-connected components of ``cls`` smaller than ``min_pixels`` set to ``fill``."""
    binary = mask == cls
    if min_pixels <= 1 or not binary.any():
        return mask
    labels, areas = components(binary)
    small = areas < min_pixels
    small[0] = False  # label 0 is everything that is not the class
    if not small.any():
        return mask
    out = mask.copy()
    out[small[labels]] = fill
    return out


def component_labels(region: np.ndarray, as_index: bool = True) -> np.ndarray:
    """Each pixel's 8-connected component of ``region`` (0 outside it), in NumPy's index type: indexing and
    counting with it is 2-4x faster than with OpenCV's int32 (which NumPy would convert on every use).
    ``as_index=False``: OpenCV's int32 as it is, for a caller that reads only a few pixels' labels (the
    conversion costs half as much again as the labelling)."""
    _, labels = cv2.connectedComponents(region.view(np.uint8), connectivity=8)
    return labels.astype(np.intp) if as_index else labels


def components(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``component_labels`` of ``region`` and each label's area."""
    labels = component_labels(region)
    return labels, np.bincount(labels.reshape(-1))


def enclosed(region: np.ndarray) -> np.ndarray:
    """Pixels outside ``region`` that no 4-connected path outside it joins to the image border: the
    pixels ``scipy.ndimage.binary_fill_holes`` adds. The outside, framed by one more pixel, is flooded from
    the frame; what the flood does not reach is enclosed."""
    height, width = region.shape
    outside = np.ones((height + 2, width + 2), np.uint8)
    np.logical_not(region, out=outside[1:-1, 1:-1].view(bool))
    cv2.floodFill(outside, None, (0, 0), 0, flags=4)
    return outside[1:-1, 1:-1].view(bool)


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
    crf: dict[str, float] | None = None  # predictions.crf.CrfSettings, applied before the arg-max

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
    def operations(self) -> tuple[dict[str, float], set[str]]:
        """The mask operations it applies: each class's ``min_area`` above 0, the classes whose holes it fills
        (two files of equal operations change every mask alike)."""
        return {k: v for k, v in self.min_area.items() if v > 0}, {k for k, v in self.fill_holes.items() if v}

    @property
    def changes_masks(self) -> bool:
        """Whether any mask operation is set (they turn pixels into background, class 0)."""
        return any(self.operations)

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
