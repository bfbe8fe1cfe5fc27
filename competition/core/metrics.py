"""Confusion-matrix segmentation metrics, accumulated over a whole fold (not averaged per batch).

``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` from one confusion matrix summed over every pixel of every image.
A class absent from both the predictions and the targets of the whole set has no union; its IoU is NaN and it
is excluded from mIoU (``nanmean``). Target pixels equal to ``ignore_index`` are not counted. With no counted
pixel at all every IoU is NaN and mIoU is reported as NaN, never as a division error.
"""

from __future__ import annotations

import numpy as np
import torch


def target_bins(target: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """Each target pixel's class as a flat index, ``num_classes`` (a spare bin) where it is not counted
    (``ignore_index`` or out of range)."""
    target = target.reshape(-1)
    keep = (target >= 0) & (target < num_classes)  # on the stored type: uint8 masks compare 8x less memory
    if ignore_index is not None:
        keep &= target != ignore_index
    bins = target.astype(np.intp)
    bins[~keep] = num_classes
    return bins


def confusion(
    prediction: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    ignore_index: int | None,
    bins: np.ndarray | None = None,
) -> np.ndarray:
    """``[target, prediction]`` pixel counts of two class-index maps (NumPy, as ``ConfusionMatrix``).
    ``bins``: ``target_bins`` of ``target``, when the caller counts several predictions against it."""
    if bins is None:
        index = target_bins(target, num_classes, ignore_index)
        index *= num_classes  # pixels not counted land past the matrix: no compaction of the maps
    else:
        index = bins * num_classes
    index += np.clip(prediction.reshape(-1), 0, num_classes - 1)
    counts = np.bincount(index, minlength=num_classes * (num_classes + 1))
    return counts[: num_classes**2].reshape(num_classes, num_classes)


def argmax_classes(scores: np.ndarray) -> np.ndarray:
    """``scores.argmax(0)`` of ``[C, ...]`` scores (the first class of the largest score, as NumPy breaks
    ties), computed a class at a time: NumPy's arg-max over the first axis walks each pixel's C values one
    pixel at a time, 3-5x slower at C = 11. uint8 levels (stored OOF maps) take a single max over packed
    ``(level, 255 - class)`` keys. Scores must not be NaN."""
    classes = scores.shape[0]
    if scores.dtype == np.uint8 and classes <= 256:
        keys = scores.astype(np.uint16)
        keys <<= 8
        keys |= (255 - np.arange(classes, dtype=np.uint16)).reshape((-1,) + (1,) * (scores.ndim - 1))
        return (255 - (keys.max(0) & 255)).astype(np.intp)
    best, index = scores[0].copy(), np.zeros(scores.shape[1:], np.intp)
    for c in range(1, classes):
        index[scores[c] > best] = c  # strictly larger: an equal later class does not take the pixel
        np.maximum(best, scores[c], out=best)
    return index


def iou_of(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU of a confusion matrix; NaN for a class with no prediction and no target pixel."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def miou_of(matrix: np.ndarray) -> float:
    """Mean IoU over classes that have one (NaN when none has)."""
    iou = iou_of(matrix)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


class ConfusionMatrix:
    """``matrix[target, prediction]`` pixel counts for ``num_classes`` classes."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255, device: str | torch.device = "cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of class-index predictions and targets of the same shape."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        prediction, target = prediction.reshape(-1).long(), target.reshape(-1).long()
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        index = target[keep] * self.num_classes + prediction[keep].clamp(0, self.num_classes - 1)
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view_as(self.matrix)

    def all_reduce(self) -> None:
        """Sum the matrix over DDP ranks (no-op when not distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class with no prediction and no target pixel."""
        return iou_of(self.matrix.cpu().numpy())

    def miou(self) -> float:
        return miou_of(self.matrix.cpu().numpy())

    def pixel_accuracy(self) -> float:
        m = self.matrix.double()
        total = float(m.sum())
        return float(m.diag().sum()) / total if total else float("nan")


def binary_scores(matrix: ConfusionMatrix) -> dict[str, float]:
    """Pixel error and foreground IoU of a 2-class matrix (the ISBI-2012 numbers)."""
    return {"pixel_error": 1.0 - matrix.pixel_accuracy(), "foreground_iou": float(matrix.iou()[1])}
