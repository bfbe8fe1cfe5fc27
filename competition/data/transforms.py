"""Albumentations pipelines built from an ``AugmentConfig``, and per-sample seeding for reproducible runs."""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
from torch.utils.data import Dataset

from .classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize(aug: Any) -> list[A.BasicTransform]:
    if aug.normalize == "imagenet":
        return [A.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return [A.Normalize(mean=0.0, std=1.0)]  # just scale to [0, 1]


class ShapeKeepingRotate90(A.RandomRotate90):
    """``RandomRotate90`` that turns a non-square image by 0 or 180 degrees only, so full frames of one size
    (``augment.size: null``) keep one shape and still batch; square images turn by any multiple of 90."""

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        return {"factor": params["factor"] // 2 * 2} if height != width else {}


def build_train_transform(aug: Any) -> A.Compose:
    """Resize to the working scale by a random factor (``aug.scale``), random crop to ``aug.size`` (mask
    padding = ignore), geometric + colour augmentation, normalisation.

    ``elastic`` is the U-Net paper's elastic deformation; ``shift_scale_rotate`` an affine shift/scale/rotate.
    Padded mask pixels are ``IGNORE_INDEX`` so they never count in the loss.
    """
    steps: list[A.BasicTransform] = []
    if aug.scale is not None:
        if aug.eval_size is not None:
            steps.append(A.Resize(*aug.hw(aug.eval_size)))
        low, high = aug.scale
        steps.append(A.RandomScale((low - 1.0, high - 1.0), p=1.0))
    if aug.size is not None:
        height, width = aug.hw(aug.size)
        steps.append(A.RandomCrop(height, width, pad_if_needed=True, fill=0, fill_mask=IGNORE_INDEX))
    if aug.hflip:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip:
        steps.append(A.VerticalFlip(p=aug.vflip))
    if aug.rotate90:
        steps.append(ShapeKeepingRotate90(p=aug.rotate90))
    if aug.shift_scale_rotate:
        steps.append(
            A.Affine(
                scale=(0.8, 1.2),
                translate_percent=(-0.0625, 0.0625),
                rotate=(-30, 30),
                border_mode=cv2.BORDER_CONSTANT,
                fill_mask=IGNORE_INDEX,
                p=aug.shift_scale_rotate,
            )
        )
    if aug.elastic:
        steps.append(A.ElasticTransform(alpha=30, sigma=6, border_mode=cv2.BORDER_REFLECT_101, p=aug.elastic))
    if aug.color:
        steps.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=aug.color))
    return A.Compose(steps + _normalize(aug))


def build_eval_transform(aug: Any) -> A.Compose:
    """Deterministic: optional resize to ``aug.eval_size`` then the training normalisation."""
    steps: list[A.BasicTransform] = []
    if aug.eval_size is not None:
        steps.append(A.Resize(*aug.hw(aug.eval_size)))
    return A.Compose(steps + _normalize(aug))


def reseed(dataset: Dataset, seed: int) -> None:
    """Seed what draws random numbers in ``dataset``: its ``reseed`` method if it has one (datasets with
    more than a transform, such as copy-paste), else its albumentations transform."""
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)
    elif getattr(dataset, "transform", None) is not None:
        dataset.transform.set_random_seed(seed)


class EpochSeeded(Dataset):
    """Seeds the wrapped dataset's albumentations transform per (seed, epoch, index) before each sample.

    A sample's augmentation then depends only on those three numbers, not on worker count, sampling order or
    how many samples were drawn before: a resumed run, or a DDP run, sees exactly the same augmentations.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        reseed(self.dataset, (self.seed * 1_000_003 + self.epoch * 10_007 + i) % 2**32)
        return self.dataset[i]
