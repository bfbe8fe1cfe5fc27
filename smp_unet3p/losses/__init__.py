"""Losses: smp's (Dice, Jaccard, Focal, Lovasz, Tversky) by name, plus what smp lacks.

``get_loss(name, classes)`` builds any of them for a model with ``classes`` output channels
(``classes == 1``: binary target; ``classes > 1``: index target with ``ignore_index``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, JaccardLoss, LovaszLoss, TverskyLoss
from torch import nn

from .._names import did_you_mean
from ._base import CrossEntropyLoss, SoftmaxFocalLoss, loss_mode, probs_and_onehot
from .deep_supervision import DeepSupervisionLoss
from .hybrid import DiceCELoss, Unet3PlusHybridLoss, WeightedSum
from .msssim import MSSSIMLoss
from .weight_map import WeightedCrossEntropyLoss, class_balance_weights, unet_weight_map

_Factory = Callable[[int, "int | None", "Sequence[float] | None"], nn.Module]
_FACTORIES: dict[str, _Factory] = {
    "ce": lambda c, ig, w: CrossEntropyLoss(ig, w),
    "dice": lambda c, ig, w: DiceLoss(loss_mode(c), from_logits=True, ignore_index=ig),
    "jaccard": lambda c, ig, w: JaccardLoss(loss_mode(c), from_logits=True, ignore_index=ig),
    "focal": lambda c, ig, w: SoftmaxFocalLoss(ignore_index=ig, class_weights=w),
    "focal_sigmoid": lambda c, ig, w: FocalLoss(loss_mode(c), ignore_index=ig),
    "lovasz": lambda c, ig, w: LovaszLoss(loss_mode(c), ignore_index=ig),
    "tversky": lambda c, ig, w: TverskyLoss(loss_mode(c), from_logits=True, ignore_index=ig),
    "msssim": lambda c, ig, w: MSSSIMLoss(ig),
    "dice_ce": lambda c, ig, w: DiceCELoss(c, ig, class_weights=w),
    "unet3plus_hybrid": lambda c, ig, w: Unet3PlusHybridLoss(c, ig, class_weights=w),
}
_WEIGHTED = ("ce", "focal", "dice_ce", "unet3plus_hybrid")  # the losses with a per-pixel (cross-entropy) term
_ALIASES = {"iou": "jaccard", "hybrid": "unet3plus_hybrid", "unetpp_hybrid": "dice_ce", "cross_entropy": "ce"}


def available_losses() -> list[str]:
    """Names (and aliases) accepted by ``get_loss``."""
    return sorted([*_FACTORIES, *_ALIASES])


def get_loss(
    name: str, classes: int, ignore_index: int | None = 255, class_weights: Sequence[float] | None = None
) -> nn.Module:
    """Segmentation loss by name for a model with ``classes`` output channels.

    ``class_weights`` (one per class; ``classes == 1``: background, foreground) weigh the per-pixel
    cross-entropy / focal term of ``ce``, ``focal``, ``dice_ce`` and ``unet3plus_hybrid``.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _FACTORIES:
        hint = did_you_mean(name, available_losses())
        raise ValueError(f"Unknown loss {name!r}.{hint} Available: {', '.join(available_losses())}")
    if class_weights is not None:
        if key not in _WEIGHTED:
            raise ValueError(
                f"loss {name!r} has no per-pixel term to weigh by class; class weights work with "
                f"{', '.join(_WEIGHTED)}"
            )
        if len(class_weights) != max(classes, 2):
            raise ValueError(
                f"{len(class_weights)} class weights for a model with {classes} output channel(s); give "
                f"{max(classes, 2)}, one per class"
            )
    return _FACTORIES[key](classes, ignore_index, class_weights)


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
