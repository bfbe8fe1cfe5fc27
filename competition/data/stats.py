"""Dataset statistics from a mask cache: per-class images and pixel shares (CSV + bar chart). The image |
mask panels are in ``data.panels``."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..core.io import atomic_write, atomic_write_csv  # noqa: E402
from .coco import MaskCache  # noqa: E402


def class_statistics(index: pd.DataFrame, class_names: tuple[str, ...]) -> pd.DataFrame:
    """Per class: images containing it, pixels, pixel share (of labelled pixels) and its median-frequency
    weight (``median_frequency_weights``; a value for ``loss.class_weights``)."""
    counts = np.array([index[f"px_{c}"].to_numpy() for c in range(len(class_names))], np.int64)  # [C, N]
    pixels = counts.sum(1)
    return pd.DataFrame(
        {
            "class_id": range(len(class_names)),
            "class_name": class_names,
            "images": (counts > 0).sum(1),
            "pixels": pixels,
            "pixel_share": pixels / max(int(pixels.sum()), 1),
            "median_frequency_weight": median_frequency_weights(counts),
        }
    )


def median_frequency_weights(counts: np.ndarray) -> np.ndarray:
    """Median-frequency balancing (Eigen & Fergus, 2015; SegNet): ``w_c = median(f) / f_c``, where ``f_c``
    is class c's pixels over the labelled pixels of the images that contain it. ``counts``: pixels per class
    (rows) and image (columns). A class in no image gets NaN (no weight to give)."""
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    pixels_of_images = np.where(present, counts.sum(0, keepdims=True), 0.0).sum(1)
    freq = np.divide(counts.sum(1), pixels_of_images, out=np.full(len(counts), np.nan), where=present.any(1))
    return np.nanmedian(freq) / freq if np.isfinite(freq).any() else freq


def plot_statistics(stats: pd.DataFrame, path: str | os.PathLike) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.4 * len(stats) + 1.5))
    axes[0].barh(stats["class_name"], stats["images"], color="tab:blue")
    axes[0].set_xlabel("images containing the class")
    axes[1].barh(stats["class_name"], stats["pixel_share"] * 100, color="tab:orange")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("share of labelled pixels (%, log)")
    for ax in axes:
        ax.invert_yaxis()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def write_statistics(cache: MaskCache, out_dir: str | os.PathLike) -> pd.DataFrame:
    out_dir = Path(out_dir)
    stats = class_statistics(cache.index(), cache.class_map.names)
    atomic_write_csv(out_dir / "class_stats.csv", stats)
    plot_statistics(stats, out_dir / "class_stats.png")
    return stats
