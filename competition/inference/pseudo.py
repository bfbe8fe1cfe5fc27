"""The ``pseudo`` stage: confident pseudo masks of unlabelled (test) images, for the next training round.

The fold/run ensemble (+ TTA) predicts every image; each pixel gets the arg-max class, or 255 (ignored in the
loss) where the top probability is below ``threshold``. By default the set is fold-matched: fold k's masks
come from the runs' fold-k models only, which never saw fold k's validation images, so a student's OOF
predictions stay out-of-fold (``make_pseudo``). The set (``pseudo.json``, ``masks/``,
``coverage.csv``; see ``data.pseudo_labels``) is written into a temp folder and renamed, so an interrupted
run leaves nothing. Train on it with ``data.extra: [DIR]``; a second round predicts with the models of the
first round's training and writes a new set.

``class_share`` (class-balanced self-training, CBST: Zou et al., 2018): a single threshold keeps almost only
the classes the teachers are sure of (background, large regions). With a share p, each class's pixels are
also kept when their confidence is among the top p of the pixels predicted as that class over the whole set
(per fold's teachers), so rare and thin classes keep their most confident pixels too. It takes two passes:
the predictions (class and confidence, a byte each per pixel) wait in the temp folder between them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.checkpoint import read_best_meta
from ..core.io import OutputExistsError, atomic_dir, atomic_write_csv, atomic_write_text
from ..core.runtime import stage_threads
from ..data.classes import IGNORE_INDEX
from ..data.coco import load_coco, write_png
from ..data.datasets import TestImageDataset
from ..data.images import check_images
from ..data.pseudo_labels import FORMAT, MANIFEST, POOLED
from ..predictions.provenance import KEY, ProvenanceError, record
from .predictor import Ensemble, InferenceOptions, image_loader, iterate_group_predictions, load_runs


def pseudo_mask(probs: torch.Tensor, threshold: float) -> np.ndarray:
    """``[H, W]`` uint8: the arg-max class of ``probs [C, H, W]``, 255 where its probability < threshold."""
    top, classes = probs.max(0)
    mask = classes.to(torch.uint8)
    mask[top < threshold] = IGNORE_INDEX
    return mask.numpy()


def class_thresholds(histograms: np.ndarray, share: float) -> np.ndarray:
    """Per class, the confidence level (0-255) at which the top ``share`` of its predicted pixels start:
    ``histograms[c, v]`` counts pixels predicted as class c at confidence level v. A class never predicted
    gets 256 (keeps nothing)."""
    from_top = np.cumsum(histograms[:, ::-1], axis=1)  # pixels at level >= 255 - i
    wanted = np.ceil(share * histograms.sum(1, keepdims=True))
    reached = np.argmax(from_top >= np.maximum(wanted, 1), axis=1)
    levels = 255 - reached
    return np.where(histograms.sum(1) > 0, levels, 256)


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
    pooled: bool = False,
    allow_partial: bool = False,
    class_share: float | None = None,
) -> dict[str, Any]:
    """Write the pseudo-label set of every image of ``test_json`` into the folder ``out``; returns a summary
    (``coverage``: the per-image (and fold) table).

    Fold-matched by default: the masks for fold k come from the ensemble of the runs' fold-k models, so fold
    k's student never learns from a teacher that trained on fold k's validation images (the runs must share
    one folds file). ``pooled``: one mask per image from every fold model (for a model trained on all
    images; ``data.extra_pooled`` must accept it). Runs whose folds did not all finish are refused unless
    ``allow_partial``. ``class_share``: class-balanced thresholds (see the module docstring).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1) (a probability), got {threshold}")
    if class_share is not None and not 0.0 < class_share <= 1.0:
        raise ValueError(
            f"--class-share must be in (0, 1] (a share of each class's pixels), got {class_share}"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    coco = load_coco(test_json, data_root)
    if not coco.images:
        raise ValueError(f"test set {test_json} has no images to pseudo-label")
    image_names = [info.file_name for info in coco.images.values()]
    check_images(data_root, image_names, str(test_json), "--data-root")  # before any model loads
    loaded = load_runs(runs, weights, device, allow_partial)
    names, opts = loaded.names, opts or InferenceOptions()
    threads = stage_threads(workers)
    print(f"pseudo: {len(coco.images)} images x {len(loaded.specs)} models on {device}, {threads} threads, "
          f"{workers} workers", flush=True)  # fmt: skip
    folds_hash = None if pooled else _shared_folds(loaded.infos)
    groups = {POOLED: loaded.specs} if pooled else {str(k): s for k, s in loaded.by_fold().items()}
    ensembles = {key: Ensemble(specs, opts) for key, specs in groups.items()}
    dataset = TestImageDataset(data_root, coco)
    loader = image_loader(
        dataset, {(i.height, i.width) for i in coco.images.values()}, batch_size, workers, device
    )
    origin = record("pseudo", loaded.infos, names, threshold=threshold, tta=opts.views, scales=opts.scales,
                    partial=loaded.partial, class_share=class_share)  # fmt: skip
    rows, items, levels = [], [], {}
    histograms = {key: np.zeros((len(names), 256), np.int64) for key in groups}
    with atomic_dir(out, overwrite) as tmp:
        for key in groups:
            (tmp / _mask_dir(key)).mkdir(parents=True)

        def write(n: int, file_name: str, key: str, mask: np.ndarray) -> str:
            write_png(tmp / f"{_mask_dir(key)}/{n:06d}.png", mask)
            rows.append({**coverage_row(file_name, mask, names), "fold": key})
            return f"{_mask_dir(key)}/{n:06d}.png"

        bar = tqdm(total=len(dataset), desc="pseudo", unit="img", disable=not progress)
        predictions = iterate_group_predictions(ensembles, loader, device)
        for n, (_, file_name, per_key) in enumerate(predictions):
            masks = {}
            for key, probs in per_key.items():
                if class_share is None:
                    masks[key] = write(n, file_name, key, pseudo_mask(probs, threshold))
                    continue
                top, classes = probs.max(0)
                packed = np.stack([classes.numpy().astype(np.uint8), (top * 255).round().byte().numpy()])
                flat = packed[0].ravel().astype(np.int64) * 256 + packed[1].ravel()
                histograms[key] += np.bincount(flat, minlength=histograms[key].size).reshape(-1, 256)
                np.save(tmp / f"{_mask_dir(key)}/{n:06d}.npy", packed)
            items.append({"file_name": file_name, "masks": masks})
            bar.update()
        bar.close()
        if class_share is not None:  # second pass: each class's own level, or the global threshold if lower
            floor = int(np.ceil(threshold * 255))
            levels = {
                key: np.minimum(class_thresholds(h, class_share), floor) for key, h in histograms.items()
            }
            for n, item in enumerate(items):
                for key in groups:
                    stored = tmp / f"{_mask_dir(key)}/{n:06d}.npy"
                    classes, confidence = np.load(stored)
                    keep = confidence >= levels[key][classes]
                    mask = np.where(keep, classes, IGNORE_INDEX).astype(np.uint8)
                    item["masks"][key] = write(n, item["file_name"], key, mask)
                    stored.unlink()
        coverage = pd.DataFrame(rows)
        atomic_write_csv(tmp / "coverage.csv", coverage)
        manifest = {
            "format": FORMAT,
            "class_names": names,
            "threshold": threshold,
            "class_share": class_share,
            "class_thresholds": {k: dict(zip(names, (v / 255).round(4).tolist())) for k, v in levels.items()},
            "image_root": str(Path(data_root).resolve()),
            "fold_matched": not pooled,
            "folds_hash": folds_hash,
            "folds": None if pooled else [int(k) for k in groups],
            "teachers": None if pooled else _teachers(loaded.infos, [int(k) for k in groups]),
            KEY: origin,
            "images": items,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    objects = float(coverage[names[1:]].to_numpy().sum()) if len(names) > 1 else 1.0
    if objects == 0.0:
        warnings.warn(
            f"pseudo set {out} has no confident object pixel: at --threshold {threshold} the ensemble is "
            "sure only of background, so training on it teaches background. Use a lower --threshold (e.g. "
            "0.5) or stronger teachers",
            stacklevel=2,
        )
    return {"dir": out, "images": len(items), "classes": names, "coverage": coverage}


def _mask_dir(key: str) -> str:
    return "masks" if key == POOLED else f"masks/fold{key}"


def _shared_folds(infos: Sequence[Any]) -> str:
    """The folds hash every teacher run shares (fold-matched labels need one folds file)."""
    hashes = {info.name: info.folds_hash for info in infos}
    if None in hashes.values() or len(set(hashes.values())) > 1:
        raise ProvenanceError(
            f"fold-matched pseudo-labels need runs trained on one known folds file; folds hashes: {hashes}. "
            "Pass --pooled for one set from every fold model (then train with data.extra_pooled=true)"
        )
    return next(iter(hashes.values()))


def _teachers(infos: Sequence[Any], folds: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Per fold, the record of each teacher model that labelled it: its run, folder, fold and the folds file
    hash of its own ``best.json`` (each fold's, not the run's first)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for k in folds:
        for info in (i for i in infos if k in i.folds and i.folds[k].has_best):
            meta = read_best_meta(info.folds[k].dir)
            record = {"run": info.name, "dir": str(info.folds[k].dir.resolve()), "fold": int(meta["fold"])}
            record["folds_hash"] = meta.get("folds_hash", info.folds_hash)
            out.setdefault(str(k), []).append(record)
    return out


def coverage_summary(coverage: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Per class: its share of all pixels (over every fold's masks) and the number of images where some
    fold's mask labels it."""

    def images(selected: pd.Series) -> int:
        return int(coverage.loc[selected, "file_name"].nunique())

    return pd.DataFrame(
        {
            "class_name": list(names) + ["(ignored)"],
            "pixel_share": [coverage[n].mean() for n in names] + [1.0 - coverage["confident"].mean()],
            "images": [images(coverage[n] > 0) for n in names] + [images(coverage["confident"] < 1)],
        }
    )
