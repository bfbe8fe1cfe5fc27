"""Copy-paste augmentation (Ghiasi et al., 2021) for semantic masks: object instances from the COCO
annotations of other training images, pasted onto a training image before the albumentations pipeline.

Sources are annotations of the given image ids only (a fold's training split, so nothing of the validation
split leaks in); crowd and empty annotations are skipped. With ``mask_path`` (the mask cache) only an
instance's visible pixels are pasted: where a smaller object covers part of it in its source image, that part
is not pasted with its class. With ``balanced`` the class is drawn first (every class with instances equally
likely), then an instance of it, so rare classes are pasted as often as common ones. With ``classes`` only
instances of those classes are sources (on street scenes: the thing classes, not road or sky). Each pasted
object is resized by a factor drawn from ``scale`` and placed at a random spot inside the image; its pixels
replace the image's (and the mask gets its class), so image and mask stay aligned. All draws come from the
``rng`` the caller passes, seeded per (seed, epoch, index).

No maintained package does this for semantic masks from COCO instances: albumentations 2.0 has no
copy-paste, and the PyPI copy-paste packages are unmaintained forks of one 2021 repository built around
instance targets (boxes + per-instance masks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from .coco import CocoIndex, annotation_rle, instance_region, load_mask, safe_join
from .images import read_image


class CopyPaste:
    """Paste ``1..max_objects`` instances with probability ``p`` (see the module docstring)."""

    def __init__(
        self,
        coco: CocoIndex,
        category_to_class: Mapping[int, int],
        data_root: str | os.PathLike,
        image_ids: Sequence[int],
        p: float,
        max_objects: int = 3,
        scale: tuple[float, float] = (0.5, 1.5),
        balanced: bool = True,
        mask_path: Callable[[int], Path] | None = None,
        first_object: int = 1,
        classes: Collection[int] | None = None,
    ):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"copy-paste probability must be in [0, 1], got {p}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"copy-paste scale must be (low, high) with 0 < low <= high, got {scale}")
        self.coco, self.root, self.mask_path = coco, Path(data_root), mask_path
        self.p, self.max_objects, self.scale, self.balanced = p, max_objects, scale, balanced
        # (image id, annotation position, class) of every usable source instance
        self.instances = [
            (image_id, k, category_to_class[ann["category_id"]])
            for image_id in image_ids
            for k, ann in enumerate(coco.annotations.get(image_id, []))
            if not ann["iscrowd"] and category_to_class.get(ann["category_id"], -1) >= first_object
        ]
        if classes is not None:
            self.instances = [instance for instance in self.instances if instance[2] in classes]
        self.by_class: dict[int, list[int]] = {}
        for n, (_, _, cls) in enumerate(self.instances):
            self.by_class.setdefault(cls, []).append(n)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # a few hundred patches, FIFO

    def __len__(self) -> int:
        return len(self.instances)

    def patch(self, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Source instance ``n`` cropped to its box: image ``[h, w, 3]``, region ``[h, w]`` bool (its visible
        pixels: where the source's class mask shows its class, not where another object covers it), class."""
        if n not in self._cache:
            if len(self._cache) >= 256:
                self._cache.pop(next(iter(self._cache)))
            self._cache[n] = self._load_patch(n)
        return self._cache[n]

    def _load_patch(self, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        image_id, k, cls = self.instances[n]
        info = self.coco.images[image_id]
        ann = self.coco.annotations[image_id][k]
        x, y, region = instance_region(annotation_rle(ann["segmentation"], info.height, info.width))
        box = (slice(y, y + region.shape[0]), slice(x, x + region.shape[1]))
        image = read_image(safe_join(self.root, info.file_name))[box]
        if self.mask_path is not None:  # only what the source shows of the instance
            region = region & (load_mask(self.mask_path(image_id))[box] == cls)
        return image, region, cls

    def choose(self, rng: np.random.Generator, exclude_image: int | None = None) -> list[int]:
        """Instance numbers to paste (maybe none), never from ``exclude_image``."""
        if not self.instances or rng.random() >= self.p:
            return []
        chosen = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            if self.balanced:
                pool = self.by_class[int(rng.choice(sorted(self.by_class)))]
                n = pool[int(rng.integers(len(pool)))]
            else:
                n = int(rng.integers(len(self.instances)))
            if self.instances[n][0] != exclude_image:
                chosen.append(n)
        return chosen

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, image_id: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``image`` ``[H, W, 3]`` uint8 and ``mask`` ``[H, W]`` with the chosen instances pasted (copies)."""
        chosen = self.choose(rng, image_id)
        if not chosen:
            return image, mask
        image, mask = image.copy(), mask.copy()
        height, width = mask.shape
        for n in chosen:
            patch, region, cls = self.patch(n)
            factor = float(rng.uniform(*self.scale))
            factor = min(factor, height / patch.shape[0], width / patch.shape[1])  # it must fit
            h, w = max(1, round(patch.shape[0] * factor)), max(1, round(patch.shape[1] * factor))
            if (h, w) != patch.shape[:2]:
                patch = cv2.resize(patch, (w, h), interpolation=cv2.INTER_LINEAR)
                region = cv2.resize(region.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
            y, x = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            image[y : y + h, x : x + w][region] = patch[region]
            mask[y : y + h, x : x + w][region] = cls
        return image, mask
