"""Classification-Guided Module (CGM) of UNet 3+, extended to multi-class presence gating.

The paper (Huang et al., 2020) puts dropout -> 1x1 conv -> global max pool -> sigmoid on the deepest encoder
feature, predicts whether the organ is present, and multiplies the segmentation by the argmax of that
prediction. Here the head predicts one presence logit per class (multi-label) and gates each class map:

- gating is done on logits, as ``logits + log(gate)``: multiplying a class's unnormalised probability
  ``exp(logit)`` by the gate. A hard gate of 0 becomes a large negative offset, so an absent class gets
  probability ~0 under both softmax and sigmoid (multiplying logits by 0 would give sigmoid 0.5 instead).
- ``mode="hard"``: gate = 1[sigmoid(presence) > threshold] (the paper's argmax for the binary case);
  ``mode="soft"``: gate = sigmoid(presence).
- with ``classes > 1`` the background class (``background``, default 0) is never gated; ``background=None``
  (data without a background class) gates every class; with ``classes == 1`` the single foreground channel
  is gated.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassificationGuidedModule", "gate_logits", "presence_from_mask"]

ABSENT_LOGIT_OFFSET = -1.0e4  # finite (fp16/bf16-safe) stand-in for log(0)
_SOFT_GATE_FLOOR = 1.0e-6


class ClassificationGuidedModule(nn.Sequential):
    """dropout -> 1x1 conv -> global max pool -> flatten: presence logits ``[B, classes]``."""

    def __init__(self, in_channels: int, classes: int, dropout: float = 0.5):
        super().__init__(
            nn.Dropout(p=dropout) if dropout else nn.Identity(),
            nn.Conv2d(in_channels, classes, kernel_size=1),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )


def gate_logits(
    masks: torch.Tensor,
    presence_logits: torch.Tensor,
    mode: str = "hard",
    threshold: float = 0.5,
    background: int | None = 0,
) -> torch.Tensor:
    """Gate segmentation logits ``[B, C, H, W]`` by per-class presence logits ``[B, C]``; the
    ``background`` channel (``None``: none) is left as it is when ``C > 1``."""
    prob = presence_logits.sigmoid().to(masks.dtype)
    if mode == "hard":
        offset = torch.where(
            prob > threshold, torch.zeros_like(prob), torch.full_like(prob, ABSENT_LOGIT_OFFSET)
        )
    elif mode == "soft":
        offset = prob.clamp_min(_SOFT_GATE_FLOOR).log()
    else:
        raise ValueError(f"CGM gate mode must be 'hard' or 'soft', got {mode!r}")
    if masks.shape[1] > 1 and background is not None:  # background is never gated
        offset = offset.masked_fill(torch.arange(offset.shape[1], device=offset.device) == background, 0.0)
    return masks + offset[:, :, None, None]


def presence_from_mask(mask: torch.Tensor, classes: int, ignore_index: int | None = 255) -> torch.Tensor:
    """Multi-label presence targets ``[B, classes]`` (float 0/1) from a segmentation target.

    ``mask`` is an index mask ``[B, H, W]`` (or ``[B, 1, H, W]``); with ``classes == 1`` it is a binary
    mask and presence means "any foreground pixel". Pixels equal to ``ignore_index`` are not counted.
    """
    flat = mask.reshape(mask.shape[0], -1)
    valid = torch.ones_like(flat, dtype=torch.bool) if ignore_index is None else flat != ignore_index
    if classes == 1:
        return ((flat > 0.5) & valid).any(dim=1, keepdim=True).float()
    values = flat[valid]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= classes):
        raise ValueError(f"mask holds values outside [0, {classes}) other than ignore_index={ignore_index}")
    index = torch.where(valid, flat.long(), torch.full_like(flat, classes, dtype=torch.long))
    presence = torch.zeros(flat.shape[0], classes + 1, device=mask.device)
    presence.scatter_(1, index, 1.0)
    return presence[:, :classes]
