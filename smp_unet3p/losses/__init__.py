"""Losses: smp's (Dice, Jaccard, Focal, Lovasz, Tversky) by name, plus what smp lacks.

``get_loss(name, classes)`` builds any of them for a model with ``classes`` output channels
(``classes == 1``: binary target; ``classes > 1``: index target with ``ignore_index``).
"""

from __future__ import annotations

from collections.abc import Callable

from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, JaccardLoss, LovaszLoss, TverskyLoss
from torch import nn

from .._names import did_you_mean
from ._base import CrossEntropyLoss, SoftmaxFocalLoss, loss_mode, probs_and_onehot
from .deep_supervision import DeepSupervisionLoss
from .hybrid import DiceCELoss, Unet3PlusHybridLoss, WeightedSum
from .msssim import MSSSIMLoss
from .weight_map import WeightedCrossEntropyLoss, class_balance_weights, unet_weight_map

_FACTORIES: dict[str, Callable[[int, int | None], nn.Module]] = {
    "ce": lambda c, ig: CrossEntropyLoss(ig),
    "dice": lambda c, ig: DiceLoss(loss_mode(c), from_logits=True, ignore_index=ig),
    "jaccard": lambda c, ig: JaccardLoss(loss_mode(c), from_logits=True, ignore_index=ig),
    "focal": lambda c, ig: SoftmaxFocalLoss(ignore_index=ig),
    "focal_sigmoid": lambda c, ig: FocalLoss(loss_mode(c), ignore_index=ig),
    "lovasz": lambda c, ig: LovaszLoss(loss_mode(c), ignore_index=ig),
    "tversky": lambda c, ig: TverskyLoss(loss_mode(c), from_logits=True, ignore_index=ig),
    "msssim": lambda c, ig: MSSSIMLoss(ig),
    "dice_ce": lambda c, ig: DiceCELoss(c, ig),
    "unet3plus_hybrid": lambda c, ig: Unet3PlusHybridLoss(c, ig),
}
_ALIASES = {"iou": "jaccard", "hybrid": "unet3plus_hybrid", "unetpp_hybrid": "dice_ce", "cross_entropy": "ce"}


def available_losses() -> list[str]:
    """Names (and aliases) accepted by ``get_loss``."""
    return sorted([*_FACTORIES, *_ALIASES])


def get_loss(name: str, classes: int, ignore_index: int | None = 255) -> nn.Module:
    """Segmentation loss by name for a model with ``classes`` output channels."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _FACTORIES:
        hint = did_you_mean(name, available_losses())
        raise ValueError(f"Unknown loss {name!r}.{hint} Available: {', '.join(available_losses())}")
    return _FACTORIES[key](classes, ignore_index)


__all__ = [
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "DiceCELoss",
    "DiceLoss",
    "FocalLoss",
    "JaccardLoss",
    "LovaszLoss",
    "MSSSIMLoss",
    "SoftmaxFocalLoss",
    "TverskyLoss",
    "Unet3PlusHybridLoss",
    "WeightedCrossEntropyLoss",
    "WeightedSum",
    "available_losses",
    "class_balance_weights",
    "get_loss",
    "loss_mode",
    "probs_and_onehot",
    "unet_weight_map",
]
