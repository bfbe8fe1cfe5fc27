"""Checkpoint averaging (SWA, Izmailov et al., 2018) over the last epochs of a fold: ``train.swa_epochs``.

At the end of each of the last ``swa_epochs`` epochs the model's weights join an equal-weight running average
(BatchNorm statistics averaged with them, as averaging saved checkpoints does, so no extra pass over the
data). From the first averaged epoch on, validation, the kept weights (``best.safetensors``) and the OOF
predictions use the average. The average starts afresh at its window's first epoch, so a run extended with
more epochs averages its new last epochs only. Its state is in ``last.ckpt``: a resumed fold averages exactly
what an uninterrupted one does.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel


class CheckpointAverage:
    """The running average of the end-of-epoch weights of the last ``epochs`` of ``total`` epochs."""

    def __init__(self, model: nn.Module, epochs: int | None):
        self.epochs = epochs or 0
        self.average = AveragedModel(model, use_buffers=True) if self.epochs else None

    def first(self, total: int) -> int:
        """The first averaged epoch (0-based) of a fold of ``total`` epochs."""
        return max(0, total - self.epochs)

    def update(self, model: nn.Module, epoch: int, total: int) -> None:
        """Add ``model``'s weights at the end of ``epoch`` (0-based) when it is in the window."""
        if self.average is None or epoch < self.first(total):
            return
        if epoch == self.first(total):  # a new window (a run extended with epochs averages anew)
            self.average.n_averaged.zero_()
        self.average.update_parameters(model)

    def module(self, epoch: int, total: int) -> nn.Module | None:
        """The averaged model once ``epoch`` (0-based, finished) is in the window, else ``None``."""
        if self.average is None or epoch < self.first(total) or not int(self.average.n_averaged):
            return None
        return self.average.module

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.average is None else self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.average is not None and state is not None:
            self.average.load_state_dict(state)
