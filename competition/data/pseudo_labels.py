"""Pseudo-labelled image sets: the folder ``competition pseudo`` writes, and the dataset training reads.

A set is a folder with ``pseudo.json`` (format, class names, threshold, the image root, whether it is
fold-matched and the hash of the teachers' folds file, the teachers' provenance, and per image its file name
and mask files), ``masks/`` (class ids; 255 = ignored, where the ensemble was not confident) and
``coverage.csv``. A fold-matched set holds one mask per image and fold, made by the teachers' fold-k models
only: fold k's student trains on them, and those teachers never saw fold k's validation images, so the
student's OOF predictions stay out-of-fold. Training adds the sets listed in ``data.extra`` to the training
split of each fold, never to validation. A set is refused when its class list differs from the run's, when
its teachers trained on another folds file, when it is pooled (unless ``data.extra_pooled``), or when any of
its images shows the same picture as a labelled image (compared on decoded pixels, so a PNG copy of a
training JPEG is caught: a test image that is also in the training data would leak its label).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from ..core.config import ConfigError
from .coco import load_mask, safe_join
from .images import read_image

MANIFEST = "pseudo.json"
FORMAT = 2  # 1: one pooled mask per image and the SHA-256 of its bytes (read as a pooled set)
POOLED = "all"  # the mask key of a pooled set
THUMB = 32  # side of the greyscale thumbnails the leak guard compares
SAME_PIXELS_RMS = 3.0  # RMS difference (0-255 grey levels) of thumbnails below which two images are the same


@functools.lru_cache(maxsize=65536)
def _thumbnail(path: str, mtime_ns: int, size: int) -> np.ndarray:
    grey = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()


def thumbnail(path: str | os.PathLike) -> np.ndarray:
    """The decoded pixels of an image as a ``THUMB x THUMB`` greyscale thumbnail (flat float64): the same
    picture stored as JPEG, PNG or re-encoded gives (nearly) the same thumbnail. Cached per file version."""
    stat = os.stat(path)
    return _thumbnail(str(path), stat.st_mtime_ns, stat.st_size)


def same_pictures(
    images: Sequence[str | os.PathLike], others: Sequence[str | os.PathLike]
) -> list[tuple[str, str]]:
    """``(image, other)`` pairs whose thumbnails differ by less than ``SAME_PIXELS_RMS`` (root mean square,
    grey levels): the same picture, whatever its file format or name."""
    if not images or not others:
        return []
    a = np.stack([thumbnail(p) for p in images])
    b = np.stack([thumbnail(p) for p in others])
    # squared distances through one matrix product: |a|^2 + |b|^2 - 2 a.b
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    hits = np.argwhere(d2 < SAME_PIXELS_RMS**2 * a.shape[1])
    return [(str(images[i]), str(others[j])) for i, j in hits]


@dataclass
class PseudoSet:
    """A pseudo-labelled set read from its folder and checked (every mask file present).

    ``fold_matched``: each image has one mask per fold (``masks[str(k)]``), made by the teachers' fold-k
    models only, and ``folds_hash`` names the folds file the teachers trained on. A pooled set has one mask
    per image (``masks["all"]``), made by every fold model.
    """

    dir: Path
    class_names: list[str]
    image_root: Path
    threshold: float
    items: list[dict[str, Any]]
    fold_matched: bool = False
    folds_hash: str | None = None
    folds: list[int] | None = None
    teachers: dict[str, list[dict[str, Any]]] | None = None  # fold -> its teacher models' own records

    @classmethod
    def read(cls, folder: str | os.PathLike) -> PseudoSet:
        folder = Path(folder)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise ConfigError(
                f"data.extra: {folder} is not a pseudo-label set (no {MANIFEST}); make one with "
                "`competition pseudo`"
            )
        try:
            raw = json.loads(manifest.read_text())
            if raw.get("format") not in (1, FORMAT):
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
            if raw["format"] == 1:
                items = [
                    {"file_name": str(i["file_name"]), "masks": {POOLED: str(i["mask"])}}
                    for i in raw["images"]
                ]
            else:
                items = [
                    {
                        "file_name": str(i["file_name"]),
                        "masks": {str(k): str(v) for k, v in i["masks"].items()},
                    }
                    for i in raw["images"]
                ]
            names, root = list(raw["class_names"]), Path(raw["image_root"])
            matched = bool(raw.get("fold_matched", False))
            found = cls(folder, names, root, float(raw["threshold"]), items, matched, raw.get("folds_hash"),
                        raw.get("folds"), raw.get("teachers"))  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"data.extra: {manifest} is malformed: {exc!r}") from None
        missing = [m for i in items for m in i["masks"].values() if not (folder / m).is_file()]
        if missing:
            raise ConfigError(f"data.extra: {folder} lacks {len(missing)} mask files: {missing[:5]}")
        return found

    def mask_key(self, fold: int) -> str:
        return str(fold) if self.fold_matched else POOLED

    def check(
        self,
        class_names: Sequence[str],
        labelled: Sequence[str | os.PathLike],
        fold: int,
        folds_hash: str,
        allow_pooled: bool = False,
    ) -> None:
        """Refuse another class list; for fold ``fold`` of a run on the folds file of ``folds_hash``, a set
        not fold-matched to that folds file (a pooled one unless ``allow_pooled``); and images whose pixels
        equal a labelled image's (``labelled``: the files of every labelled image)."""
        where = f"data.extra: {self.dir}"
        if list(class_names) != self.class_names:
            raise ConfigError(
                f"{where} was labelled with classes {self.class_names}, this run trains {list(class_names)}"
            )
        if not self.fold_matched and not allow_pooled:
            raise ConfigError(
                f"{where} was labelled by every fold model (pooled): fold {fold}'s model would learn from "
                f"teachers that trained on fold {fold}'s validation images, and its OOF score would be "
                "optimistic. Make a fold-matched set (competition pseudo without --pooled), or set "
                "data.extra_pooled=true to accept it"
            )
        if self.fold_matched and self.folds_hash != folds_hash:
            raise ConfigError(
                f"{where} was labelled by teachers trained on another folds file (folds {self.folds_hash}, "
                f"this run's {folds_hash}): fold-matched labels need the same folds"
            )
        if self.fold_matched and fold not in (self.folds or []):
            raise ConfigError(f"{where} has no labels for fold {fold} (its folds: {self.folds})")
        for teacher in (self.teachers or {}).get(str(fold), []) if self.fold_matched else []:
            if teacher.get("folds_hash") != folds_hash or int(teacher.get("fold", fold)) != fold:
                raise ConfigError(
                    f"{where}: fold {fold}'s labels were made by {teacher.get('dir')} (fold "
                    f"{teacher.get('fold')}, folds {teacher.get('folds_hash')}), not by a fold-{fold} model "
                    f"of this run's folds file ({folds_hash}): it may have trained on fold {fold}'s "
                    "validation images"
                )
        same = same_pictures([safe_join(self.image_root, i["file_name"]) for i in self.items], labelled)
        if same:
            shown = [f"{Path(a).name} = {b}" for a, b in same[:3]]
            raise ConfigError(
                f"{where}: {len(same)} images show the same picture as labelled images ({shown}); a pseudo "
                "set must hold only unlabelled images"
            )


class PseudoLabelDataset(Dataset):
    """The images of a ``PseudoSet`` with their pseudo masks for fold ``fold`` (255 where ignored)."""

    def __init__(self, pseudo: PseudoSet, fold: int, transform: Any = None):
        self.pseudo, self.key, self.transform = pseudo, pseudo.mask_key(fold), transform

    def __len__(self) -> int:
        return len(self.pseudo.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from .datasets import check_same_size, to_sample

        item = self.pseudo.items[i]
        path = safe_join(self.pseudo.image_root, item["file_name"])
        mask_path = self.pseudo.dir / item["masks"][self.key]
        image, mask = read_image(path), load_mask(mask_path)
        check_same_size(image, mask, path, str(mask_path))
        sample = to_sample(image, mask, self.transform)
        return {**sample, "image_id": f"pseudo:{item['file_name']}", "file_name": item["file_name"]}


class TrainingSet(ConcatDataset):
    """A fold's training split followed by pseudo-labelled sets. ``reseed`` reaches every part (see
    ``EpochSeeded``), and image ids are text so labelled and pseudo samples batch together."""

    def reseed(self, seed: int) -> None:
        from .transforms import reseed

        for part in self.datasets:
            reseed(part, seed)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = super().__getitem__(i)
        return {**sample, "image_id": str(sample["image_id"])}


def with_extra(
    train: Dataset,
    folders: Sequence[os.PathLike],
    class_names: Sequence[str],
    labelled_files: Sequence[Path],
    transform: Any,
    fold: int,
    folds_hash: str,
    allow_pooled: bool = False,
) -> Dataset:
    """``train`` (fold ``fold``'s training split) plus the pseudo sets in ``folders``, each checked
    (``PseudoSet.check``) against the class list, the run's folds file and every labelled image."""
    if not folders:
        return train
    sets = [PseudoSet.read(f) for f in folders]
    for s in sets:
        s.check(class_names, labelled_files, fold, folds_hash, allow_pooled)
    return TrainingSet([train, *(PseudoLabelDataset(s, fold, transform) for s in sets)])
