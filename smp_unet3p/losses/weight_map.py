"""The U-Net paper's pixel weight map and a cross-entropy that uses it (Ronneberger et al., 2015).

``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))``

``w_c`` balances class frequencies, ``d1``/``d2`` are the distances to the nearest and second-nearest object.
The border term is applied to background pixels (class 0), the gaps between touching objects that the
paper wants separated; with fewer than two objects it is zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ._base import CrossEntropyLoss


def class_balance_weights(mask: np.ndarray, ignore_index: int | None = 255) -> np.ndarray:
    """Per-pixel ``w_c = n_pixels / (n_classes_present * n_pixels_of_class)``: mean 1 over valid pixels."""
    valid = np.ones(mask.shape, bool) if ignore_index is None else mask != ignore_index
    labels, counts = np.unique(mask[valid], return_counts=True)
    weights = np.zeros(mask.shape, np.float64)
    for label, count in zip(labels, counts):
        weights[mask == label] = valid.sum() / (len(labels) * count)
    return weights


def unet_weight_map(
    mask: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str | Sequence[float] | None = "balanced",
    instances: np.ndarray | None = None,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Weight map ``[H, W]`` (float32) for a label mask ``[H, W]``.

    Args:
        mask: class index per pixel, 0 = background.
        w0, sigma: border term amplitude and width (paper: 10 and 5 px).
        class_weights: ``"balanced"`` (see ``class_balance_weights``), one weight per class index, or ``None``
            (``w_c = 1``).
        instances: optional instance ids (0 = none); default: connected components (8-connected) of each
            foreground class.
        ignore_index: label whose pixels get weight 0.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    if class_weights is None:
        weights = np.ones(mask.shape, np.float64)
    elif isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced', a sequence or None, got {class_weights!r}")
        weights = class_balance_weights(mask, ignore_index)
    else:
        table = np.asarray(class_weights, np.float64)
        fg = mask if ignore_index is None else np.where(mask == ignore_index, 0, mask)
        if fg.max() >= len(table):
            raise ValueError(f"class_weights has {len(table)} entries but mask holds class {int(fg.max())}")
        weights = table[fg]

    if instances is None:
        instances = np.zeros(mask.shape, np.int64)
        structure = np.ones((3, 3), bool)
        for label in np.unique(mask):
            if label == 0 or label == ignore_index:
                continue
            components, count = ndimage.label(mask == label, structure=structure)
            instances[components > 0] = components[components > 0] + instances.max()
    ids = [i for i in np.unique(instances) if i != 0]
    if len(ids) >= 2:
        d1 = np.full(mask.shape, np.inf)
        d2 = np.full(mask.shape, np.inf)
        for obj in ids:  # running two smallest distances: O(H*W) memory whatever the object count
            dist = ndimage.distance_transform_edt(instances != obj)
            d2 = np.minimum(d2, np.maximum(d1, dist))
            d1 = np.minimum(d1, dist)
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
        weights = weights + np.where(mask == 0, border, 0.0)
    if ignore_index is not None:
        weights = np.where(mask == ignore_index, 0.0, weights)
    return weights.astype(np.float32)


class WeightedCrossEntropyLoss(nn.Module):
    """Cross-entropy weighted per pixel: ``sum(w * ce) / sum(valid)`` (the U-Net energy, averaged)."""

    def __init__(self, ignore_index: int | None = 255):
        super().__init__()
        self.ce = CrossEntropyLoss(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor) -> torch.Tensor:
        loss, valid = self.ce.pixel_loss(logits, target)
        weight_map = weight_map.reshape(loss.shape).to(loss.dtype)
        return (loss * weight_map).sum() / valid.sum().clamp_min(1)
