"""A small synthetic trash dataset in the Boostcamp layout (COCO json + images), for the demo and tests.

Each image has a textured background and 1-4 random polygons. The class sets an object's hue and its
texture (stripe period and angle), so the classes are learnable; an image holds only some of the classes.
Objects are drawn largest first, the order in which ``rasterize`` paints masks, so image and mask agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..core.io import atomic_write_text
from .classes import BOOSTCAMP_CLASSES


def _class_look(cls: int, classes: int) -> tuple[np.ndarray, float, float]:
    """Colour (RGB), stripe period and stripe angle of a foreground class."""
    hue = int(180 * (cls - 1) / (classes - 1))
    hsv = np.uint8([[[hue, 200, 220]]])
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    return colour, 3.0 + 2 * (cls % 4), np.pi * (cls % 3) / 3


def _polygon(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random star-shaped polygon ``[N, 2]`` (x, y) inside the image."""
    n = int(rng.integers(5, 10))
    radius = rng.uniform(0.08, 0.22) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.55, 1.0, n)
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    return np.clip(points, 0, size - 1)


def _image(
    rng: np.random.Generator, size: int, classes: int, frequency: np.ndarray | None = None
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(40, 160, 3).astype(np.float32)
    slope = rng.uniform(-0.4, 0.4, 2)
    image = base + (slope[0] * xx + slope[1] * yy)[..., None] + rng.normal(0, 8, (size, size, 3))
    present = rng.choice(np.arange(1, classes), size=int(rng.integers(1, 5)), replace=False, p=frequency)
    objects = [(int(cls), _polygon(rng, size)) for cls in present]
    objects.sort(key=lambda o: -cv2.contourArea(o[1].astype(np.float32)))
    for cls, points in objects:
        region = np.zeros((size, size), np.uint8)
        cv2.fillPoly(region, [np.round(points).astype(np.int32)], 1)
        colour, period, angle = _class_look(cls, classes)
        stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        texture = colour[None, None] * (0.8 + 0.2 * stripes[..., None])
        image[region.astype(bool)] = texture[region.astype(bool)]
    return np.clip(image, 0, 255).astype(np.uint8), objects


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 40,
    n_test: int = 10,
    size: int = 128,
    seed: int = 0,
    class_names: tuple[str, ...] = BOOSTCAMP_CLASSES,
    class_frequency: Sequence[float] | None = None,
) -> dict[str, Path]:
    """Write ``train.json``, ``test.json`` (no annotations) and JPEG images under ``out_dir``.

    ``class_frequency``: relative weight of each foreground class when an image's classes are drawn (default:
    all equal), e.g. to make some classes rare as Battery and Clothing are in the Boostcamp data.

    Images go into two folders (``batch_01``, ``batch_02``) like Boostcamp's ``batch_01_vt``.
    Returns the paths.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    classes = len(class_names)
    frequency = None
    if class_frequency is not None:
        if len(class_frequency) != classes - 1 or min(class_frequency) <= 0:
            raise ValueError(f"class_frequency needs {classes - 1} positive weights, got {class_frequency}")
        frequency = np.asarray(class_frequency, float) / np.sum(class_frequency)
    categories = [{"id": i, "name": n, "supercategory": n} for i, n in enumerate(class_names) if i > 0]
    coco: dict[str, dict[str, Any]] = {
        split: {"images": [], "annotations": [], "categories": categories} for split in ("train", "test")
    }
    ann_id = 0
    for index in range(n_train + n_test):
        split = "train" if index < n_train else "test"
        file_name = f"batch_{1 + index % 2:02d}/{split}_{index:04d}.jpg"
        image, objects = _image(rng, size, classes, frequency)
        (out / file_name).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(
            str(out / file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
        ):
            raise OSError(f"could not write {out / file_name}")
        coco[split]["images"].append({"id": index, "file_name": file_name, "height": size, "width": size})
        if split == "test":
            continue
        for cls, points in objects:
            x, y = points.min(0)
            w, h = points.max(0) - points.min(0)
            coco[split]["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": index,
                    "category_id": cls,
                    "segmentation": [np.round(points, 1).ravel().tolist()],
                    "area": float(cv2.contourArea(points.astype(np.float32))),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    paths = {}
    for split, content in coco.items():
        paths[split] = atomic_write_text(out / f"{split}.json", json.dumps(content))
    paths["root"] = out
    return paths
