"""Apply a segmentation loss to every output of a model: main mask, side outputs, CGM presence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.cgm import presence_from_mask


class DeepSupervisionLoss(nn.Module):
    """Loss over a model output of any shape smp_unet3p models produce.

    - a tensor (any smp model, or ``Unet3Plus`` in eval mode): ``loss(masks, target)``;
    - a ``(masks, labels)`` tuple (smp ``aux_params``): the masks term only;
    - a ``Unet3PlusTrainOutput`` dict: ``loss(masks) + sum_i w_i * loss(side_i)``
      ``+ cgm_weight * BCE(presence)``,
      presence targets built from the mask with ``presence_from_mask``.

    Args:
        loss: segmentation loss ``(logits, target) -> scalar``.
        classes: number of model output channels (for presence targets).
        side_weights: weight of each side output (shallow to deep), one float for all, default 1.0.
        cgm_weight: weight of the presence BCE.
        ignore_index: target value excluded from presence.
    """

    def __init__(
        self,
        loss: nn.Module,
        classes: int,
        side_weights: float | Sequence[float] = 1.0,
        cgm_weight: float = 1.0,
        ignore_index: int | None = 255,
    ):
        super().__init__()
        self.loss = loss
        self.classes = classes
        self.side_weights = side_weights
        self.cgm_weight = cgm_weight
        self.ignore_index = ignore_index

    def _side_weights(self, count: int) -> list[float]:
        if isinstance(self.side_weights, (int, float)):
            return [float(self.side_weights)] * count
        weights = list(self.side_weights)
        if len(weights) != count:
            raise ValueError(
                f"side_weights has {len(weights)} values but the model gave {count} side outputs"
            )
        return weights

    def terms(self, output: Any, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each weighted term of the total loss by name (``masks``, ``side0``.., ``presence``)."""
        if isinstance(output, torch.Tensor):
            return {"masks": self.loss(output, target)}
        if isinstance(output, (tuple, list)):
            return {"masks": self.loss(output[0], target)}
        if not isinstance(output, Mapping) or "masks" not in output:
            raise TypeError(f"cannot compute a loss on model output of type {type(output).__name__}")
        terms = {"masks": self.loss(output["masks"], target)}
        sides = output.get("side_masks") or []
        for i, (weight, side) in enumerate(zip(self._side_weights(len(sides)), sides)):
            terms[f"side{i}"] = weight * self.loss(side, target)
        if output.get("presence") is not None:
            presence = output["presence"]
            wanted = presence_from_mask(target, self.classes, self.ignore_index).to(presence.dtype)
            terms["presence"] = self.cgm_weight * F.binary_cross_entropy_with_logits(presence, wanted)
        return terms

    def forward(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(self.terms(output, target).values())).sum()
