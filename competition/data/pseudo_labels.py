"""Pseudo-labelled image sets: the folder ``competition pseudo`` writes, and the dataset training reads.

A set is a folder with ``pseudo.json`` (format, class names, threshold, the image root, and per image its
file name, mask file and the SHA-256 of the image's bytes), ``masks/*.png`` (class ids; 255 = ignored, where
the ensemble was not confident) and ``coverage.csv``. Training adds sets listed in ``data.extra`` to the
training split of every fold, never to validation. A set is refused when its class list differs from the
run's or when any of its images has the same content as a labelled image (a test image that is also in the
training data would leak its own pseudo label into validation).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from ..config import ConfigError
from .coco import load_mask, safe_join

MANIFEST = "pseudo.json"
FORMAT = 1


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class PseudoSet:
    """A pseudo-labelled set read from its folder and checked (every mask file present)."""

    dir: Path
    class_names: list[str]
    image_root: Path
    threshold: float
    items: list[dict[str, Any]]

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
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
            items = [{k: str(item[k]) for k in ("file_name", "mask", "sha256")} for item in raw["images"]]
            names, root = list(raw["class_names"]), Path(raw["image_root"])
            found = cls(folder, names, root, float(raw["threshold"]), items)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"data.extra: {manifest} is malformed: {exc!r}") from None
        missing = [i["mask"] for i in items if not (folder / i["mask"]).is_file()]
        if missing:
            raise ConfigError(f"data.extra: {folder} lacks {len(missing)} mask files: {missing[:5]}")
        return found

    def check(self, class_names: Sequence[str], labelled: Mapping[str, str]) -> None:
        """Refuse another class list, or images whose content equals a labelled image (``labelled``:
        SHA-256 -> file name of every labelled image)."""
        if list(class_names) != self.class_names:
            raise ConfigError(
                f"data.extra: {self.dir} was labelled with classes {self.class_names}, this run trains "
                f"{list(class_names)}"
            )
        same = [f"{i['file_name']} = {labelled[i['sha256']]}" for i in self.items if i["sha256"] in labelled]
        if same:
            raise ConfigError(
                f"data.extra: {len(same)} images of {self.dir} have the same content as labelled images "
                f"({same[:3]}); a pseudo set must hold only unlabelled images"
            )


class PseudoLabelDataset(Dataset):
    """The images of a ``PseudoSet`` with their pseudo masks (255 where ignored)."""

    def __init__(self, pseudo: PseudoSet, transform: Any = None):
        self.pseudo, self.transform = pseudo, transform

    def __len__(self) -> int:
        return len(self.pseudo.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from .datasets import check_same_size, to_sample
        from .images import read_image

        item = self.pseudo.items[i]
        path = safe_join(self.pseudo.image_root, item["file_name"])
        image, mask = read_image(path), load_mask(self.pseudo.dir / item["mask"])
        check_same_size(image, mask, path, str(self.pseudo.dir / item["mask"]))
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
) -> Dataset:
    """``train`` plus the pseudo sets in ``folders``, checked against the class list and every labelled
    image."""
    if not folders:
        return train
    sets = [PseudoSet.read(f) for f in folders]
    labelled = {file_digest(p): str(p) for p in labelled_files}
    for s in sets:
        s.check(class_names, labelled)
    return TrainingSet([train, *(PseudoLabelDataset(s, transform) for s in sets)])
