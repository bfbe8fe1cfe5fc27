"""Hybrid losses of UNet++ (CE + soft Dice) and UNet 3+ (focal + MS-SSIM + IoU)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segmentation_models_pytorch.losses import DiceLoss, JaccardLoss
from torch import nn

from ._base import CrossEntropyLoss, SoftmaxFocalLoss, loss_mode
from .msssim import MSSSIMLoss


class WeightedSum(nn.Module):
    """Weighted sum of named losses, with the terms kept for logging (``last_terms``: detached tensors, so
    the training step never waits for the device to read them)."""

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float] | None = None):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: 1.0 for name in terms} | dict(weights or {})
        unknown = set(self.weights) - set(terms)
        if unknown:
            raise ValueError(
                f"weights given for unknown loss terms {sorted(unknown)}; terms: {sorted(terms)}"
            )
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for name, term in self.terms.items():
            value = term(logits, target)
            self.last_terms[name] = value.detach()
            total = total + self.weights[name] * value
        return total


class DiceCELoss(WeightedSum):
    """UNet++ hybrid: cross-entropy (``class_weights`` weigh it; see ``CrossEntropyLoss``) + soft Dice."""

    def __init__(
        self,
        classes: int,
        ignore_index: int | None = 255,
        weights: dict[str, float] | None = None,
        class_weights: Sequence[float] | None = None,
    ):
        super().__init__(
            {
                "ce": CrossEntropyLoss(ignore_index, class_weights),
                "dice": DiceLoss(loss_mode(classes), from_logits=True, ignore_index=ignore_index),
            },
            weights,
        )


class Unet3PlusHybridLoss(WeightedSum):
    """UNet 3+ hybrid: focal (pixel; ``class_weights`` weigh it) + MS-SSIM (patch) + IoU (map) losses."""

    def __init__(
        self,
        classes: int,
        ignore_index: int | None = 255,
        weights: dict[str, float] | None = None,
        class_weights: Sequence[float] | None = None,
    ):
        super().__init__(
            {
                "focal": SoftmaxFocalLoss(ignore_index=ignore_index, class_weights=class_weights),
                "msssim": MSSSIMLoss(ignore_index),
                "iou": JaccardLoss(loss_mode(classes), from_logits=True, ignore_index=ignore_index),
            },
            weights,
        )
