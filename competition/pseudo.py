"""The ``pseudo`` stage: confident pseudo masks of unlabelled (test) images, for the next training round.

The fold/run ensemble (+ TTA) predicts every image; each pixel gets the arg-max class, or 255 (ignored in the
loss) where the top probability is below ``threshold``. The set (``pseudo.json``, ``masks/``,
``coverage.csv``; see ``data.pseudo_labels``) is written into a temp folder and renamed, so an interrupted
run leaves nothing. Train on it with ``data.extra: [DIR]``; a second round predicts with the models of the
first round's training and writes a new set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data.coco import IGNORE_INDEX, load_coco, safe_join, write_png
from .data.datasets import TestImageDataset
from .data.pseudo_labels import FORMAT, MANIFEST, file_digest
from .io import OutputExistsError, atomic_dir, atomic_write_csv, atomic_write_text
from .predictor import Ensemble, InferenceOptions, image_loader, iterate_predictions, load_specs


def pseudo_mask(probs: torch.Tensor, threshold: float) -> np.ndarray:
    """``[H, W]`` uint8: the arg-max class of ``probs [C, H, W]``, 255 where its probability < threshold."""
    top, classes = probs.max(0)
    mask = classes.to(torch.uint8)
    mask[top < threshold] = IGNORE_INDEX
    return mask.numpy()


def coverage_row(file_name: str, mask: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Share of the image that is confident, and share of each class."""
    counts = np.bincount(mask.ravel(), minlength=256) / mask.size
    return {"file_name": file_name, "confident": 1.0 - counts[IGNORE_INDEX]} | {
        name: counts[c] for c, name in enumerate(names)
    }


def make_pseudo(
    runs: Sequence[str | os.PathLike],
    data_root: str | os.PathLike,
    test_json: str | os.PathLike,
    out: str | os.PathLike,
    threshold: float = 0.9,
    weights: Sequence[float] | None = None,
    opts: InferenceOptions | None = None,
    batch_size: int = 4,
    workers: int = 2,
    device: Any = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the pseudo-label set of every image of ``test_json`` into the folder ``out``; returns a summary
    (``coverage``: the per-image table)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1) (a probability), got {threshold}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    coco = load_coco(test_json, data_root)
    if not coco.images:
        raise ValueError(f"test set {test_json} has no images to pseudo-label")
    specs, names = load_specs(runs, weights, device)
    opts = opts or InferenceOptions()
    dataset = TestImageDataset(data_root, coco)
    loader = image_loader(
        dataset, {(i.height, i.width) for i in coco.images.values()}, batch_size, workers, device
    )
    rows, items = [], []
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "masks").mkdir()
        bar = tqdm(total=len(dataset), desc="pseudo", unit="img", disable=not progress)
        for n, (_, file_name, probs) in enumerate(iterate_predictions(Ensemble(specs, opts), loader, device)):
            mask = pseudo_mask(probs, threshold)
            mask_name = f"masks/{n:06d}.png"
            write_png(tmp / mask_name, mask)
            digest = file_digest(safe_join(data_root, file_name))
            items.append({"file_name": file_name, "mask": mask_name, "sha256": digest})
            rows.append(coverage_row(file_name, mask, names))
            bar.update()
        bar.close()
        coverage = pd.DataFrame(rows)
        atomic_write_csv(tmp / "coverage.csv", coverage)
        manifest = {
            "format": FORMAT,
            "class_names": names,
            "threshold": threshold,
            "image_root": str(Path(data_root).resolve()),
            "runs": [str(Path(r).resolve()) for r in runs],
            "tta": {"views": opts.views, "scales": opts.scales},
            "images": items,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    return {"dir": out, "images": len(items), "classes": names, "coverage": coverage}


def coverage_summary(coverage: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Per class: its share of all pixels and the number of images where it was pseudo-labelled."""
    return pd.DataFrame(
        {
            "class_name": list(names) + ["(ignored)"],
            "pixel_share": [coverage[n].mean() for n in names] + [1.0 - coverage["confident"].mean()],
            "images": [int((coverage[n] > 0).sum()) for n in names]
            + [int((coverage["confident"] < 1).sum())],
        }
    )
