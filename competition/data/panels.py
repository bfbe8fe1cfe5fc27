"""Image | mask panels with a class legend: the overlays of ``prepare``, ``predict`` and the audit gallery."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..core.io import atomic_write  # noqa: E402
from .coco import MaskCache, safe_join  # noqa: E402
from .datasets import read_image  # noqa: E402


def palette(num_classes: int, background: int | None = 0) -> np.ndarray:
    """Fixed colours per class id (``background`` black, ignore white; ``None``: every class coloured)."""
    colours = (plt.get_cmap("tab20")(np.arange(max(num_classes, 1)) % 20)[:, :3] * 255).astype(np.uint8)
    table = np.zeros((256, 3), np.uint8)
    table[:num_classes] = colours[:num_classes]
    if background is not None:
        table[background] = 0
    table[255] = 255
    return table


def overlay(
    image: np.ndarray | None,
    mask: np.ndarray,
    num_classes: int,
    alpha: float = 0.5,
    background: int | None = 0,
) -> np.ndarray:
    """RGB picture of a mask, blended on the image (where the mask is not background) when there is one."""
    coloured = palette(num_classes, background)[mask]
    if image is None:
        return coloured
    blend = (image * (1 - alpha) + coloured * alpha).astype(np.uint8)
    return blend if background is None else np.where((mask != background)[..., None], blend, image)


def write_overlays(
    cache: MaskCache, data_root: str | os.PathLike, out_dir: str | os.PathLike, count: int = 4
) -> list[Path]:
    """Image | label panels (``overlay_<id>.png``) of the first ``count`` images with objects; the label
    alone when the image file is absent."""
    out_dir = Path(out_dir)
    written = []
    index = cache.index()
    background = 0 if cache.class_map.background else None
    objects = [f"px_{c}" for c in range(cache.class_map.first_object, cache.class_map.num_classes)]
    labelled = index[index[[c for c in objects if c in index.columns]].sum(axis=1) > 0]
    for row in labelled.head(count).itertuples():
        path = safe_join(data_root, row.file_name)
        image = read_image(path) if path.is_file() else None
        panels = [("label", cache.load(row.image_id))]
        target = out_dir / f"overlay_{row.image_id}.png"
        names = cache.class_map.names
        written.append(save_panels(target, image, panels, names, title=row.file_name, background=background))
    return written


def save_panels(
    path: str | os.PathLike,
    image: np.ndarray | None,
    panels: Sequence[tuple[str, np.ndarray]],
    class_names: Sequence[str],
    title: str | None = None,
    panel_px: int = 360,
    background: int | None = 0,
) -> Path:
    """One PNG, side by side: the image, then each ``(title, class mask)`` blended on it, with a legend of
    the classes shown but ``background`` (colour per class id, as ``palette``). Every panel is ``panel_px``
    wide whatever the image size (small images are enlarged without smoothing)."""
    from matplotlib.patches import Patch

    height, width = panels[0][1].shape[:2]
    colours = palette(len(class_names), background)
    pictures = ([("image", image)] if image is not None else []) + [
        (name, overlay(image, mask, len(class_names), background=background)) for name, mask in panels
    ]
    inches = panel_px / 100
    fig, axes = plt.subplots(
        1, len(pictures), figsize=(inches * len(pictures), inches * height / width + 1.0), squeeze=False
    )
    for ax, (name, picture) in zip(axes[0], pictures):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    shown = sorted({int(c) for _, mask in panels for c in np.unique(mask)} - {background})
    label = {255: "ignore", **dict(enumerate(class_names))}
    # an edge, so that a white swatch (ignore) shows on the white page
    handles = [Patch(facecolor=colours[c] / 255, edgecolor="0.5", label=label.get(c, str(c))) for c in shown]
    # fixed margins in inches (the legend's rows, the titles): a tight layout would draw the figure once more
    tall = fig.get_figheight()
    columns = min(len(handles), 6)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.08 / tall, va="top")
    rows = -(-len(handles) // max(columns, 1))
    bottom, top = (0.1 + 0.2 * rows) / tall, 1 - (0.6 if title else 0.35) / tall
    fig.subplots_adjust(left=0.01, right=0.99, bottom=bottom, top=top, wspace=0.04)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return Path(path)
