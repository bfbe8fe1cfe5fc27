"""Dataset statistics from a mask cache: per-class images and pixel shares (CSV + bar chart), overlays."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import atomic_write, atomic_write_csv  # noqa: E402
from .coco import MaskCache, safe_join, write_png  # noqa: E402
from .datasets import read_image  # noqa: E402


def class_statistics(index: pd.DataFrame, class_names: tuple[str, ...]) -> pd.DataFrame:
    """Per class: images containing it, pixels, pixel share (of labelled pixels)."""
    pixels = np.array([index[f"px_{c}"].sum() for c in range(len(class_names))], np.int64)
    images = np.array([(index[f"px_{c}"] > 0).sum() for c in range(len(class_names))], np.int64)
    return pd.DataFrame(
        {
            "class_id": range(len(class_names)),
            "class_name": class_names,
            "images": images,
            "pixels": pixels,
            "pixel_share": pixels / max(int(pixels.sum()), 1),
        }
    )


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


def palette(num_classes: int) -> np.ndarray:
    """Fixed colours per class id (background black, ignore white)."""
    colours = (plt.get_cmap("tab20")(np.arange(max(num_classes, 1)) % 20)[:, :3] * 255).astype(np.uint8)
    table = np.zeros((256, 3), np.uint8)
    table[1:num_classes] = colours[1:num_classes]
    table[255] = 255
    return table


def overlay(image: np.ndarray | None, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """RGB picture of a mask, blended on the image when there is one."""
    coloured = palette(num_classes)[mask]
    if image is None:
        return coloured
    blend = (image * (1 - alpha) + coloured * alpha).astype(np.uint8)
    return np.where((mask > 0)[..., None], blend, image)


def write_overlays(
    cache: MaskCache,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    count: int = 4,
    max_side: int = 768,
) -> list[Path]:
    """Overlay PNGs of the first ``count`` images with objects; mask-only pictures when images are absent."""
    out_dir = Path(out_dir)
    written = []
    index = cache.index()
    labelled = index[
        index[[c for c in index.columns if c.startswith("px_") and c not in ("px_0",)]].sum(axis=1) > 0
    ]
    for row in labelled.head(count).itertuples():
        mask = cache.load(row.image_id)
        path = safe_join(data_root, row.file_name)
        image = read_image(path) if path.is_file() else None
        target = out_dir / f"overlay_{row.image_id}.png"
        written.append(save_overlay(target, image, mask, cache.class_map.num_classes, max_side))
    return written


def save_overlay(
    path: str | os.PathLike, image: np.ndarray | None, mask: np.ndarray, num_classes: int, max_side: int = 768
) -> Path:
    """Write ``overlay(image, mask)`` as a PNG (atomically), longer side shrunk to at most ``max_side``."""
    import cv2

    picture = overlay(image, mask, num_classes)
    scale = max_side / max(picture.shape[:2])
    if scale < 1:
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: write_png(tmp, np.ascontiguousarray(picture[:, :, ::-1])))


def write_statistics(cache: MaskCache, out_dir: str | os.PathLike) -> pd.DataFrame:
    out_dir = Path(out_dir)
    stats = class_statistics(cache.index(), cache.class_map.names)
    atomic_write_csv(out_dir / "class_stats.csv", stats)
    plot_statistics(stats, out_dir / "class_stats.png")
    return stats
