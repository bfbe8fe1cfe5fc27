"""MS-SSIM loss between predicted class probabilities and the one-hot target (UNet 3+)."""

from __future__ import annotations

import torch
from pytorch_msssim import ms_ssim, ssim
from torch import nn

from ._base import probs_and_onehot

# pytorch_msssim's ms_ssim needs min(H, W) > (win_size - 1) * 2**4 (four downsamplings)
_MS_SSIM_DOWNSAMPLE = 2**4


def _largest_odd_at_most(value: int) -> int:
    return value if value % 2 else value - 1


class MSSSIMLoss(nn.Module):
    """``1 - MS-SSIM(probabilities, one-hot)`` averaged over images and classes.

    Small inputs are handled: the Gaussian window shrinks so the four MS-SSIM downsamplings fit; below
    33 px (no window of at least 3 fits) it falls back to single-scale SSIM. Ignored pixels are zeroed in
    both prediction and target, so they do not count as errors.
    """

    def __init__(self, ignore_index: int | None = 255, win_size: int = 11, win_sigma: float = 1.5):
        super().__init__()
        if win_size < 3 or win_size % 2 == 0:
            raise ValueError(f"win_size must be an odd number >= 3, got {win_size}")
        self.ignore_index = ignore_index
        self.win_size = win_size
        self.win_sigma = win_sigma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, onehot, valid = probs_and_onehot(logits.float(), target, self.ignore_index)
        probs, onehot = probs * valid, onehot * valid
        side = min(logits.shape[-2:])
        win = min(self.win_size, _largest_odd_at_most((side - 1) // _MS_SSIM_DOWNSAMPLE))
        if win >= 3:
            value = ms_ssim(
                probs, onehot, data_range=1.0, win_size=win, win_sigma=self.win_sigma, size_average=False
            )
        else:
            win = max(1, min(self.win_size, _largest_odd_at_most(side)))
            value = ssim(
                probs, onehot, data_range=1.0, win_size=win, win_sigma=self.win_sigma, size_average=False
            )
        return 1.0 - value.mean()
