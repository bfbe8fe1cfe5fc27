"""Shared target handling: index masks (multi-class, ``ignore_index``) and binary masks (one channel)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def loss_mode(classes: int) -> str:
    """smp loss mode for a model with ``classes`` output channels."""
    return "binary" if classes == 1 else "multiclass"


def probs_and_onehot(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, one-hot target (both ``[B, C, H, W]``) and a valid-pixel mask ``[B, 1, H, W]``.

    ``C == 1``: sigmoid and the binary target itself; ``C > 1``: softmax and one-hot of the index target.
    """
    classes = logits.shape[1]
    target = target.reshape(logits.shape[0], *logits.shape[2:])
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    if classes == 1:
        probs = logits.sigmoid()
        onehot = (target * valid).to(logits.dtype).unsqueeze(1)
    else:
        probs = logits.softmax(dim=1)
        onehot = F.one_hot(torch.where(valid, target, 0).long(), classes).permute(0, 3, 1, 2).to(logits.dtype)
    return probs, onehot, valid.unsqueeze(1).to(logits.dtype)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy for ``C > 1`` (index target) and binary cross-entropy for ``C == 1``, with ignore.

    ``class_weights``: one weight per class index (``C == 1``: background, foreground); each pixel's loss is
    scaled by its target's weight and the mean is taken over the weights (torch's weighted mean), so equal
    weights give the plain loss.
    """

    def __init__(self, ignore_index: int | None = 255, class_weights: Sequence[float] | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weights is not None and (weights.ndim != 1 or len(weights) == 0 or not bool((weights > 0).all())):
            raise ValueError(
                f"class_weights must be positive numbers, one per class; got {list(class_weights)}"
            )
        self.register_buffer("class_weights", weights, persistent=False)

    def pixel_weights(self, target: torch.Tensor, valid: torch.Tensor, classes: int) -> torch.Tensor:
        """Each pixel's weight ``[B, H, W]`` (``class_weights`` set): its class's weight, 0 where ignored."""
        expected = max(classes, 2)
        if len(self.class_weights) != expected:
            raise ValueError(
                f"class_weights has {len(self.class_weights)} entries but the model has {classes} output "
                f"channel(s): give {expected} (one per class{', background first' if classes == 1 else ''})"
            )
        return self.class_weights[torch.where(valid, target, 0).long()] * valid

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel loss ``[B, H, W]`` and valid mask (ignored pixels have loss 0)."""
        target = target.reshape(logits.shape[0], *logits.shape[2:])
        valid = (
            torch.ones_like(target, dtype=torch.bool)
            if self.ignore_index is None
            else target != self.ignore_index
        )
        if logits.shape[1] == 1:
            loss = F.binary_cross_entropy_with_logits(
                logits[:, 0], (target * valid).to(logits.dtype), reduction="none"
            )
        else:
            loss = F.cross_entropy(logits, torch.where(valid, target, 0).long(), reduction="none")
        return loss * valid, valid

    def reduce(
        self, loss: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, classes: int
    ) -> torch.Tensor:
        """Mean of a per-pixel loss over the valid pixels, weighted by class when weights are set."""
        if self.class_weights is None:
            return loss.sum() / valid.sum().clamp_min(1)
        weights = self.pixel_weights(target.reshape(valid.shape), valid, classes)
        return (loss * weights).sum() / weights.sum().clamp_min(1e-12)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, valid = self.pixel_loss(logits, target)
        return self.reduce(loss, valid, target, logits.shape[1])


class SoftmaxFocalLoss(CrossEntropyLoss):
    """Focal loss ``(1 - p_t)**gamma * -log(p_t)``, softmax (``C > 1``) or sigmoid (``C == 1``) probabilities.

    smp's ``FocalLoss`` in multiclass mode scores every channel as an independent sigmoid, which penalises
    a perfect softmax prediction; this one matches the softmax models that UNet 3+ trains.
    """

    def __init__(
        self, gamma: float = 2.0, ignore_index: int | None = 255, class_weights: Sequence[float] | None = None
    ):
        super().__init__(ignore_index, class_weights)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce, valid = self.pixel_loss(logits, target)
        focal = (1.0 - torch.exp(-ce)).pow(self.gamma) * ce
        return self.reduce(focal, valid, target, logits.shape[1])
