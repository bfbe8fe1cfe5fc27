"""Label audit: rank training images by how much their out-of-fold prediction disagrees with their label.

An image's OOF prediction comes from models that never trained on it, so a label the models confidently
contradict (an object given another class, a missed or invented object) stands out. The score of an image is
the mean cross-entropy of its label under the OOF probabilities (soft vote of the runs) over its labelled
pixels; the CSV also gives its pixel error and most frequent confusion (label class -> predicted class).

``competition audit --runs ... --out DIR`` writes ``DIR/audit.csv`` (every training image, worst first) and
``DIR/gallery/`` (image | label | OOF prediction panels of the worst N). Images judged mislabelled go into an
exclude list of file names, for ``competition folds --exclude FILE`` or the config's ``data.exclude``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .checkpoint import fold_dirs, read_run_config
from .data.datasets import read_image
from .data.splits import data_files
from .data.stats import save_panels
from .io import atomic_write_csv, check_writable
from .oof import OofRuns
from .voting import soft_scores

EPS = 1e-4  # probability floor of the cross-entropy (float16 OOF maps hold exact zeros)


def image_scores(probs: np.ndarray, target: np.ndarray, names: Sequence[str], ignore: int) -> dict:
    """Disagreement of one image's OOF probabilities ``[C, H, W]`` with its label ``[H, W]``."""
    classes = probs.shape[0]
    valid = (target != ignore) & (target < classes)
    pred = probs.argmax(0)
    if not valid.any():
        return {"score": 0.0, "pixel_error": 0.0, "top_confusion": ""}
    t = target[valid].astype(np.int64)
    p_true = np.take_along_axis(probs[:, valid], t[None], axis=0)[0]
    wrong = pred[valid] != t
    confusion = ""
    if wrong.any():
        pairs = np.bincount(t[wrong] * classes + pred[valid][wrong], minlength=classes * classes)
        top = int(pairs.argmax())
        confusion = f"{names[top // classes]} -> {names[top % classes]} ({int(pairs[top])} px)"
    return {
        "score": float(-np.log(np.clip(p_true, EPS, 1.0)).mean()),
        "pixel_error": float(wrong.mean()),
        "top_confusion": confusion,
    }


def audit_table(
    runs: Sequence[str | os.PathLike], files: Mapping[str, str], weights: Sequence[float] | None = None
) -> pd.DataFrame:
    """Every OOF image with its scores and file name (``files``: image id -> file name), worst first
    (``rank`` 1 = most suspicious)."""
    oof = OofRuns(runs)
    rows = []
    for key, fold, probs, target in oof:
        p = soft_scores(probs, weights)
        rows.append({"image_id": key, "file_name": files[key], "fold": fold})
        rows[-1] |= image_scores(p, target, oof.class_names, oof.ignore_index)
    table = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def write_gallery(
    runs: Sequence[str | os.PathLike],
    table: pd.DataFrame,
    root: Path,
    out_dir: Path,
    count: int,
    weights: Sequence[float] | None = None,
) -> list[Path]:
    """Image | label | OOF prediction panels of the first ``count`` rows of ``table`` (images under
    ``root``; a missing image leaves its panel out)."""
    oof = OofRuns(runs)
    wanted = dict(zip(table["image_id"].head(count), table.head(count).itertuples()))
    written = []
    for key, _, probs, target in oof:
        if key not in wanted:
            continue
        row = wanted[key]
        path = root / row.file_name
        image = read_image(path) if path.is_file() else None
        if image is not None and image.shape[:2] != target.shape:
            image = cv2.resize(image, target.shape[::-1], interpolation=cv2.INTER_AREA)
        pred = soft_scores(probs, weights).argmax(0)
        title = f"#{row.rank} {row.file_name}  score {row.score:.2f}  {row.top_confusion}"
        name = f"{row.rank:04d}_{Path(row.file_name).with_suffix('').as_posix().replace('/', '_')}.png"
        panels = [("label", target), ("OOF prediction", pred)]
        written.append(save_panels(out_dir / name, image, panels, oof.class_names, title=title))
    return sorted(written)


def run_audit(
    runs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    weights: Sequence[float] | None = None,
    gallery: int = 24,
    overwrite: bool = False,
) -> tuple[pd.DataFrame, list[Path]]:
    """Write ``audit.csv`` and the gallery of the worst ``gallery`` images; returns both."""
    out_dir = Path(out_dir)
    check_writable(out_dir / "audit.csv", overwrite)
    files, root = data_files(read_run_config(fold_dirs(runs[0])[0]))  # the data the runs trained on
    table = audit_table(runs, files, weights)
    atomic_write_csv(out_dir / "audit.csv", table)
    return table, write_gallery(runs, table, root, out_dir / "gallery", gallery, weights)
