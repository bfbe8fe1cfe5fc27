"""What a fold's training leaves for people to read: ``best.json``, the epoch line, ``curves.png``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.config import Config
from ..core.io import atomic_write


@dataclass
class FoldResult:
    """What training one fold gave: its best mIoU and epoch, its ``metrics.csv`` rows, and why it stopped
    (``"patience"``: finished early; ``"time_limit"``: to be resumed; ``None``: all its epochs)."""

    fold: int
    run_dir: Path
    best_miou: float
    best_epoch: int
    metrics: pd.DataFrame
    stopped: str | None = None


def best_meta(
    cfg: Config, fold: int, names: list[str], row: dict[str, Any], ema: bool, origin: dict[str, Any]
) -> dict[str, Any]:
    """``best.json``: the fold, epoch and scores of the best weights, what rebuilds their inputs, and
    ``origin`` (``config_hash``, ``folds_hash`` and ``folds`` of the run: see ``predictions.provenance``)."""
    iou = {n: (None if math.isnan(row[f"iou_{n}"]) else float(row[f"iou_{n}"])) for n in names}
    return {
        "run": cfg.name,
        "fold": fold,
        "epoch": row["epoch"],
        "miou": row["miou"],
        "iou": iou,
        "classes": names,
        "arch": cfg.model.arch,
        "encoder_name": cfg.model.encoder_name,
        "ema": ema,
        "normalize": cfg.augment.normalize,
        "eval_size": cfg.augment.eval_size,
        **origin,
    }


def startup_line(fold: int, cfg: Any, device: Any, threads: int, images: tuple[int, int], steps: int) -> str:
    """The line printed when a fold starts: where and how it trains, on how much."""
    t = cfg.train
    on = {True: "on", False: "off"}
    flags = f"amp {t.amp}, channels_last {on[t.channels_last]}, compile {on[t.compile]}"
    return (
        f"fold {fold}: {device}, {threads} CPU thread{'s' * (threads > 1)}, {flags}; {images[0]} train / "
        f"{images[1]} val images, {steps} step{'s' * (steps > 1)} per epoch (batch {t.batch_size} x accum "
        f"{t.accum_steps}), {t.epochs} epochs"
    )


def estimate_line(fold: int, seconds: float, epochs_left: int) -> str:
    """After a fold's first epoch: how long the rest of it should take."""
    left = seconds * epochs_left
    when = (
        f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.1f} min" if left >= 90 else f"{left:.0f} s"
    )
    epochs = f"{epochs_left} epoch{'s' * (epochs_left > 1)}"
    return f"fold {fold}: {seconds:.1f} s per epoch, about {when} for the {epochs} left"


def epoch_line(fold: int, epochs: int, row: dict[str, Any], improved: bool) -> str:
    """The one summary line printed after each epoch."""
    return (
        f"fold {fold} epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  mIoU {row['miou']:.4f}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
        + ("  *best" if improved else "")
    )


CURVES_EVERY_S = 30.0  # drawing curves.png costs ~0.5 s: during a fold at most this often, and at its end


class Curves:
    """A fold's ``curves.png``: redrawn when ``every_s`` seconds have passed since the last drawing (or the
    start), and when forced (the last epoch, the end of the loop); never twice for the same rows."""

    def __init__(self, path: Path, every_s: float | None = None):
        self.path, self.every_s = path, CURVES_EVERY_S if every_s is None else every_s
        self.drawn_at, self.drawn_rows = time.monotonic(), 0

    def update(self, metrics: pd.DataFrame, force: bool = False) -> None:
        if len(metrics) == self.drawn_rows or not (force or time.monotonic() - self.drawn_at >= self.every_s):
            return
        write_curves(metrics, self.path)
        self.drawn_at, self.drawn_rows = time.monotonic(), len(metrics)


def write_curves(metrics: pd.DataFrame, path: Path) -> None:
    """Loss, mIoU and learning-rate curves of one fold as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(metrics["epoch"], metrics["train_loss"], marker=".", label="train")
    axes[0].plot(metrics["epoch"], metrics["val_loss"], marker=".", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(metrics["epoch"], metrics["miou"], marker="o")
    axes[1].set_title("validation mIoU")
    axes[2].plot(metrics["epoch"], metrics["lr"])
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)
