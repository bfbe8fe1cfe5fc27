"""``torch.utils.data.Dataset`` classes: COCO + mask cache, image folder + mask folder, test images.

Samples are dicts: ``image`` (float tensor ``[3, H, W]``; uint8 images are scaled to [0, 1] unless the
transform normalises them), ``mask`` (long tensor ``[H, W]``), ``image_id`` and ``file_name``. Albumentations
transforms get ``image`` and ``mask`` together.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .coco import CocoIndex, MaskCache, load_mask, safe_join
from .copy_paste import CopyPaste
from .images import IMAGE_SUFFIXES, read_image


def to_sample(
    image: np.ndarray, mask: np.ndarray | None, transform: Callable[..., dict[str, Any]] | None
) -> dict[str, torch.Tensor]:
    """Apply an albumentations transform to image (+ mask) and convert to tensors."""
    if transform is not None:
        out = transform(image=image, mask=mask) if mask is not None else transform(image=image)
        image, mask = out["image"], out.get("mask", mask)
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    sample = {"image": tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()}
    if mask is not None:
        sample["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long()
    return sample


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_source: str) -> None:
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(
            f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its mask ({mask_source}) is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )


class CocoSegmentationDataset(Dataset):
    """Images of a COCO file with their cached class masks (build the cache first: ``cache.build()``)."""

    def __init__(
        self,
        cache: MaskCache,
        data_root: str | os.PathLike,
        image_ids: Sequence[int] | None = None,
        transform: Callable[..., dict[str, Any]] | None = None,
        paste: CopyPaste | None = None,
    ):
        if not cache.is_complete():
            raise RuntimeError(
                f"mask cache {cache.dir} is not built; run `competition prepare` or cache.build()"
            )
        self.cache, self.root, self.transform, self.paste = cache, Path(data_root), transform, paste
        self._seed: int | None = None
        self.image_ids = list(image_ids) if image_ids is not None else cache.coco.image_ids()
        unknown = [i for i in self.image_ids if i not in cache.coco.images]
        if unknown:
            raise KeyError(f"image ids not in {cache.coco.path}: {unknown[:10]}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def reseed(self, seed: int) -> None:
        """Seed the transform and the copy-paste draws of the next sample."""
        self._seed = seed
        if self.transform is not None:
            self.transform.set_random_seed(seed)

    def __getitem__(self, i: int) -> dict[str, Any]:
        info = self.cache.coco.images[self.image_ids[i]]
        path = safe_join(self.root, info.file_name)
        image = read_image(path)
        if image.shape[:2] != (info.height, info.width):
            raise ValueError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} but {self.cache.coco.path.name} says "
                f"{info.width}x{info.height} (image id {info.id})"
            )
        mask = self.cache.load(info.id)
        check_same_size(image, mask, path, str(self.cache.mask_path(info.id)))
        if self.paste is not None:
            image, mask = self.paste(image, mask, np.random.default_rng(self._seed), info.id)
        sample = to_sample(image, mask, self.transform)
        return {**sample, "image_id": info.id, "file_name": info.file_name}


class MaskFolderDataset(Dataset):
    """Image folder + mask folder matched by file stem (e.g. ISBI-2012: ``image/0.png`` + ``label/0.png``).

    ``value_map``: ``"binary"`` (mask > 127 -> 1), a mapping raw value -> class, or ``None`` (as stored).
    With ``num_classes``, a mask holding a value that maps to no class id (``0..num_classes-1``) nor
    ``ignore_index`` raises an error naming the file and the values: a multi-class mask read with the wrong
    map must not train silently.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        mask_dir: str | os.PathLike,
        transform: Callable[..., dict[str, Any]] | None = None,
        value_map: str | Mapping[int, int] | None = None,
        stems: Sequence[str] | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
    ):
        self.image_dir, self.mask_dir, self.transform = Path(image_dir), Path(mask_dir), transform
        self.num_classes, self.ignore_index = num_classes, ignore_index
        images = {p.stem: p for p in sorted(self.image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in sorted(self.mask_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        missing = sorted(set(images) - set(masks))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images in {self.image_dir} have no mask in {self.mask_dir}: {missing[:10]}"
            )
        self.stems = [str(s) for s in stems] if stems is not None else sorted(images, key=_natural_key)
        unknown = [s for s in self.stems if s not in images]
        if unknown:
            raise FileNotFoundError(
                f"{len(unknown)} image stems not found in {self.image_dir}: {unknown[:10]}"
            )
        self.images, self.masks = images, masks
        if isinstance(value_map, str) and value_map != "binary":
            raise ValueError(f"value_map must be 'binary', a mapping or None, got {value_map!r}")
        self.value_map = value_map

    def __len__(self) -> int:
        return len(self.stems)

    def _map_values(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if self.value_map == "binary":
            return (raw > 127).astype(np.uint8)
        if self.num_classes is not None:
            allowed = set(self.value_map) if self.value_map is not None else set(range(self.num_classes))
            found = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
            bad = sorted(set(found.tolist()) - allowed - {self.ignore_index})
            if bad:
                raise ValueError(
                    f"mask {path} holds values {bad[:10]} (all values: {found.tolist()[:20]}) that are no "
                    f"class id 0..{self.num_classes - 1} nor the ignore index {self.ignore_index}"
                    + (" under data.value_map" if self.value_map is not None else "")
                    + ": set data.value_map (binary, or {value: class}) to say how to read them"
                )
        if self.value_map is None:
            return raw
        table = np.full(256, 255, np.uint8)
        for value, cls in self.value_map.items():
            table[value] = cls
        return table[raw]

    def __getitem__(self, i: int) -> dict[str, Any]:
        stem = self.stems[i]
        image = read_image(self.images[stem])
        raw = load_mask(self.masks[stem])
        check_same_size(image, raw, self.images[stem], str(self.masks[stem]))
        sample = to_sample(image, self._map_values(raw, self.masks[stem]), self.transform)
        return {**sample, "image_id": stem, "file_name": self.images[stem].name}


class TestImageDataset(Dataset):
    """Images without masks (a test COCO file, or a folder); samples carry id, file name and original size."""

    def __init__(
        self,
        data_root: str | os.PathLike,
        coco: CocoIndex | None = None,
        transform: Callable[..., dict[str, Any]] | None = None,
    ):
        self.root, self.transform = Path(data_root), transform
        if coco is not None:
            self.items = [(info.id, info.file_name) for info in coco.images.values()]
        else:
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            self.items = [(str(p.relative_to(self.root)), str(p.relative_to(self.root))) for p in files]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id, file_name = self.items[i]
        image = read_image(safe_join(self.root, file_name))
        sample = to_sample(image, None, self.transform)
        return {**sample, "image_id": image_id, "file_name": file_name, "size": torch.tensor(image.shape[:2])}


def _natural_key(stem: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem))
