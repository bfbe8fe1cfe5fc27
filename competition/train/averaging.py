"""Checkpoint averaging (SWA, Izmailov et al., 2018) over the last epochs of a fold: ``train.swa_epochs``.

At the end of each of the last ``swa_epochs`` epochs the model's weights are kept (on the CPU) and the kept
weights are averaged with equal weight (BatchNorm statistics averaged with them, as averaging saved
checkpoints does, so no extra pass over the data; integer buffers such as BatchNorm's batch counter take the
latest value). From the first averaged epoch on, validation, the kept weights (``best.safetensors``) and the
OOF predictions use the average.

The average is always exactly that of the epochs in the window of the run **as it now ends**: a run extended
with more epochs (``--resume RUN train.epochs=N``) drops the epochs that fell out of its window, even when it
is extended by fewer epochs than the window holds (a running average could not forget them). The kept
weights are in ``last.ckpt``, so a resumed fold averages exactly what an uninterrupted one does; they cost
``swa_epochs`` copies of the weights there.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class CheckpointAverage:
    """The average of the end-of-epoch weights of the last ``epochs`` of ``total`` epochs."""

    def __init__(self, model: nn.Module, epochs: int | None):
        self.epochs = epochs or 0
        self.average = copy.deepcopy(model) if self.epochs else None
        self.kept: list[dict[str, Any]] = []  # {"epoch": 0-based, "count": epochs it stands for, "state"}
        self._averaged: list[int] = []  # the epochs self.average now holds the mean of

    def first(self, total: int) -> int:
        """The first averaged epoch (0-based) of a fold of ``total`` epochs."""
        return max(0, total - self.epochs)

    def update(self, model: nn.Module, epoch: int, total: int) -> None:
        """Keep ``model``'s weights at the end of ``epoch`` (0-based) when it is in the window."""
        if self.average is None or epoch < self.first(total):
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        kept = [k for k in self.kept if k["epoch"] < epoch]  # an epoch run again replaces its entry
        self.kept = kept + [{"epoch": epoch, "count": 1, "state": state}]

    def module(self, epoch: int, total: int) -> nn.Module | None:
        """The averaged model once ``epoch`` (0-based, finished) is in the window, else ``None``."""
        if self.average is None or epoch < self.first(total):
            return None
        self.kept = [k for k in self.kept if self.first(total) <= k["epoch"] <= epoch]
        if not self.kept:
            return None
        epochs = [k["epoch"] for k in self.kept]
        if epochs != self._averaged:
            self.average.load_state_dict(_mean(self.kept))
            self._averaged = epochs
        return self.average

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.average is None else {"kept": self.kept}

    def load_state_dict(self, state: dict[str, Any] | None, epoch: int = -1) -> None:
        """Restore what ``state_dict`` returned. A ``last.ckpt`` of an older version holds a running
        average (``AveragedModel``'s state) instead: it is kept as one entry standing for its
        ``n_averaged`` epochs, the last of them ``epoch``; exact unless the run is extended by fewer epochs
        than the window."""
        if self.average is None or state is None:
            return
        if "kept" in state:
            self.kept = [dict(k) for k in state["kept"]]
        else:
            weights = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
            self.kept = [{"epoch": epoch, "count": int(state["n_averaged"]), "state": weights}]
        self._averaged = []


def _mean(kept: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The count-weighted mean of the kept floating-point tensors; other tensors from the latest entry."""
    total = sum(k["count"] for k in kept)
    out = {}
    for name, latest in kept[-1]["state"].items():
        if latest.is_floating_point():
            out[name] = sum(k["state"][name].double() * k["count"] for k in kept).div(total).to(latest.dtype)
        else:
            out[name] = latest
    return out
