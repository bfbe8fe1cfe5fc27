"""COCO annotations -> class-index masks, validated, with a content-keyed on-disk cache.

What is fatal and what is skipped:

- fatal (``CocoFormatError`` naming the file and the item): unreadable or malformed JSON, missing top-level
  keys, image entries without a valid ``id``/``file_name``/``width``/``height``, duplicate image or category
  ids, duplicate file names, file names that escape the data root (absolute or ``..``), categories
  that match no class (by name, after the optional merge map).
- kept with a warning: duplicate annotation ids (real TACO has two; ids only label annotations here).
- skipped with a warning and a count (``CocoIndex.issues``): annotations missing keys, pointing at an
  unknown image or category, with no usable polygon (fewer than 3 points, odd length, non-finite
  coordinates), or an RLE whose size differs from its image. Polygon parts that are degenerate are dropped
  from an otherwise valid annotation.

Overlaps are resolved deterministically: annotations are drawn from the largest area to the smallest (ties
by annotation id), so small objects lying on bigger ones stay visible. ``iscrowd=1`` regions are drawn as
their class (``crowd="class"``) or as the ignore index 255 (``crowd="ignore"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from ..core.io import atomic_write, atomic_write_csv, atomic_write_text
from .classes import (
    IGNORE_INDEX,
    ClassMap,
    CocoFormatError,
)

CACHE_VERSION = 1


def safe_join(root: str | os.PathLike, file_name: str) -> Path:
    """``root / file_name``, refusing names that are absolute or climb out of ``root`` (``..``). A folder
    the user linked into the root (a read-only dataset mount, a shared folder) is the user's choice, and
    followed."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise CocoFormatError(f"empty or non-string file name {file_name!r}")
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise CocoFormatError(f"file name {file_name!r} escapes the data root {root}")
    return Path(root).resolve() / file_name  # folders the user linked into the root are followed


@dataclass
class ImageInfo:
    id: int
    file_name: str
    height: int
    width: int


@dataclass
class CocoIndex:
    """A validated COCO file: images, usable annotations per image, categories, what was skipped."""

    path: Path
    images: dict[int, ImageInfo]
    categories: dict[int, str]
    annotations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    issues: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    digest: str = ""

    def image_ids(self) -> list[int]:
        return list(self.images)


def folder_index(folder: str | os.PathLike) -> CocoIndex:
    """Every image under ``folder`` (recursively, in path order) as a COCO index without annotations, its
    file names relative to ``folder``: a test set that needs no json."""
    from .images import IMAGE_SUFFIXES, read_image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CocoFormatError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    images = {}
    for i, path in enumerate(files):
        height, width = read_image(path).shape[:2]
        images[i] = ImageInfo(i, path.relative_to(folder).as_posix(), height, width)
    return CocoIndex(folder, images, {}, {i: [] for i in images})


def _fatal(path: Path, message: str) -> CocoFormatError:
    return CocoFormatError(f"{path}: {message}")


def _clean_segmentation(ann: dict[str, Any], image: ImageInfo) -> tuple[Any, str | None]:
    """Validated segmentation (polygon parts or RLE) or ``(None, reason)``."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        parts = []
        for part in seg:
            if not isinstance(part, list) or len(part) < 6 or len(part) % 2:
                continue
            try:
                coords = [float(v) for v in part]
            except (TypeError, ValueError):
                continue
            if all(math.isfinite(v) for v in coords):
                parts.append(coords)
        if not parts:
            return None, "polygon with fewer than 3 points or non-finite coordinates"
        return parts, None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [image.height, image.width]:
            return None, f"RLE size {list(seg['size'])} differs from image size {[image.height, image.width]}"
        return seg, None
    return None, f"unsupported segmentation of type {type(seg).__name__}"


def load_coco(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> CocoIndex:
    """Read and validate a COCO file; ``data_root`` (default: the file's folder) bounds every file name."""
    path = Path(path)
    root = Path(data_root) if data_root is not None else path.parent
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise CocoFormatError(f"cannot read annotation file {path}: {exc}") from exc
    try:
        data = json.loads(raw_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fatal(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _fatal(path, f"top level must be an object, got {type(data).__name__}")
    needed = ("images", "categories") if data.get("annotations") else ("images",)  # a test set: images only
    missing = [k for k in needed if k not in data]
    if missing:
        raise _fatal(path, f"missing top-level keys {missing}")
    for key in ("images", "categories", "annotations"):
        if key in data and not isinstance(data[key], list):
            raise _fatal(path, f"'{key}' must be a list")

    categories: dict[int, str] = {}
    for i, cat in enumerate(data.get("categories", [])):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise _fatal(path, f"category #{i} lacks 'id' or 'name': {cat!r}")
        if cat["id"] in categories:
            raise _fatal(path, f"duplicate category id {cat['id']}")
        categories[cat["id"]] = str(cat["name"])

    images: dict[int, ImageInfo] = {}
    seen_files: dict[str, int] = {}
    for i, img in enumerate(data["images"]):
        try:
            info = ImageInfo(int(img["id"]), str(img["file_name"]), int(img["height"]), int(img["width"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise _fatal(
                path, f"image #{i} needs integer 'id', 'height', 'width' and a 'file_name': {exc!r}"
            ) from exc
        if info.height <= 0 or info.width <= 0:
            raise _fatal(path, f"image id {info.id} ({info.file_name}) has size {info.width}x{info.height}")
        if info.id in images:
            raise _fatal(path, f"duplicate image id {info.id} ({info.file_name})")
        if info.file_name in seen_files:
            raise _fatal(
                path,
                f"file name {info.file_name!r} used by image ids {seen_files[info.file_name]} and {info.id}",
            )
        try:
            safe_join(root, info.file_name)
        except CocoFormatError as exc:
            raise _fatal(path, f"image id {info.id}: {exc}") from exc
        seen_files[info.file_name] = info.id
        images[info.id] = info

    index = CocoIndex(path, images, categories, {i: [] for i in images})
    index.digest = hashlib.sha256(raw_bytes).hexdigest()
    seen_ann: set[Any] = set()

    def report(kind: str, message: str) -> None:
        index.issues[kind] += 1
        index.problems.append(message)

    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or any(
            k not in ann for k in ("id", "image_id", "category_id", "segmentation")
        ):
            report("missing keys", f"annotation #{i}: needs id, image_id, category_id, segmentation")
            continue
        if ann["id"] in seen_ann:
            report("duplicate annotation id (kept)", f"annotation {ann['id']}: duplicate id, kept both")
        seen_ann.add(ann["id"])
        image = images.get(ann["image_id"])
        if image is None:
            report("unknown image", f"annotation {ann['id']}: unknown image_id {ann['image_id']}")
            continue
        if ann["category_id"] not in categories:
            report("unknown category", f"annotation {ann['id']}: unknown category_id {ann['category_id']}")
            continue
        seg, reason = _clean_segmentation(ann, image)
        if seg is None:
            report(
                "bad segmentation", f"annotation {ann['id']} (image {image.id}, {image.file_name}): {reason}"
            )
            continue
        index.annotations[image.id].append(
            {
                "id": ann["id"],
                "category_id": ann["category_id"],
                "segmentation": seg,
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )
    if index.issues:  # one line per problem (the first 10), then the count of each kind
        lines = [f"{path.name}: {problem}" for problem in index.problems[:10]]
        if len(index.problems) > 10:
            lines.append(f"{path.name}: ... and {len(index.problems) - 10} more annotation problems")
        kinds = ", ".join(f"{kind}: {count}" for kind, count in index.issues.items())
        lines.append(f"{path}: {sum(index.issues.values())} annotation problems ({kinds})")
        warnings.warn("\n".join(lines), stacklevel=2)
    return index


def annotation_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """One RLE for a validated segmentation (multi-part polygon, uncompressed or compressed RLE)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {
        "size": list(segmentation["size"]),
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }


def instance_region(rle: dict[str, Any]) -> tuple[int, int, np.ndarray]:
    """An annotation's mask cropped to its box: the box's top-left ``(x, y)`` and the bool region."""
    x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
    return x, y, mask_utils.decode(rle)[y : y + h + 1, x : x + w + 1].astype(bool)


def rasterize(
    annotations: Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    category_to_class: Mapping[int, int],
    crowd: str = "class",
    fill: int = 0,
) -> np.ndarray:
    """Class-index mask ``[H, W]`` uint8: largest annotations first, smaller ones on top (ties by id);
    ``fill`` where no annotation is (0 = background, or the ignore index)."""
    if crowd not in ("class", "ignore"):
        raise ValueError(f"crowd must be 'class' or 'ignore', got {crowd!r}")
    mask = np.full((height, width), fill, np.uint8)
    rles = [(annotation_rle(a["segmentation"], height, width), a) for a in annotations]
    areas = [int(mask_utils.area(rle)) for rle, _ in rles]
    order = sorted(range(len(rles)), key=lambda i: (-areas[i], rles[i][1]["id"]))
    for i in order:
        rle, ann = rles[i]
        if areas[i] == 0:
            continue
        value = (
            IGNORE_INDEX if ann["iscrowd"] and crowd == "ignore" else category_to_class[ann["category_id"]]
        )
        x, y, region = instance_region(rle)
        mask[y : y + region.shape[0], x : x + region.shape[1]][region] = value
    return mask


# masks are long runs of few values: zlib level 1 without PNG row filters writes ~5x faster than the
# defaults and reads ~2x faster, at about the same size (measured on TACO, see docs/benchmarks.md)
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def write_png(path: Path, array: np.ndarray) -> None:
    """Lossless PNG written for speed."""
    if not cv2.imwrite(str(path), array, _PNG_PARAMS):
        raise OSError(f"could not write {path}")


def _histogram(mask: np.ndarray) -> np.ndarray:
    """Pixel count of every uint8 value (class ids and the ignore index)."""
    return np.bincount(mask.ravel(), minlength=256)


def _build_one(task: tuple) -> tuple[int, np.ndarray]:
    image_id, height, width, annotations, category_to_class, crowd, fill, out = task
    mask = rasterize(annotations, height, width, category_to_class, crowd, fill)
    atomic_write(out, lambda tmp: write_png(tmp, mask))
    return image_id, _histogram(mask)


class MaskCache:
    """Masks of one COCO file under one class map, built once and reused.

    The folder is ``cache_root/<annotation stem>-<key>``, the key hashing the annotation file's bytes, the
    class map and the crowd mode, so any change builds a new cache. Every mask is written to a temp file and
    renamed, so an interrupted build leaves only whole masks, and the next build makes the missing ones.
    ``index.csv`` (per image: size, mask file, pixel count per class and of ignore) is written last.
    """

    def __init__(
        self, coco: CocoIndex, class_map: ClassMap, cache_root: str | os.PathLike, crowd: str = "class"
    ):
        self.coco, self.class_map, self.crowd = coco, class_map, crowd
        key = hashlib.sha256(f"{CACHE_VERSION}|{coco.digest}|{class_map.key()}|{crowd}".encode()).hexdigest()[
            :16
        ]
        self.dir = Path(cache_root) / f"{coco.path.stem}-{key}"

    @property
    def index_path(self) -> Path:
        return self.dir / "index.csv"

    def mask_path(self, image_id: int) -> Path:
        return self.dir / "masks" / f"{image_id}.png"

    def is_complete(self) -> bool:
        return self.index_path.is_file()

    def build(self, workers: int = 0, progress: bool = True) -> pd.DataFrame:
        """Build missing masks (in ``workers`` processes; 0 = all cores) and return the index."""
        if self.is_complete():
            return self.index()
        (self.dir / "masks").mkdir(parents=True, exist_ok=True)
        for stale in (self.dir / "masks").glob(".*.tmp.png"):
            stale.unlink(missing_ok=True)
        counts: dict[int, np.ndarray] = {}
        todo = []
        for info in self.coco.images.values():
            out = self.mask_path(info.id)
            if out.is_file():  # from an interrupted build: whole by construction
                counts[info.id] = _histogram(load_mask(out))
                continue
            anns = self.coco.annotations[info.id]
            todo.append(
                (
                    info.id,
                    info.height,
                    info.width,
                    anns,
                    dict(self.class_map.category_to_class),
                    self.crowd,
                    self.class_map.unannotated,
                    out,
                )
            )
        workers = workers or os.cpu_count() or 1
        bar = tqdm(
            total=len(todo), desc=f"masks -> {self.dir.name}", unit="img", disable=not progress or not todo
        )
        parallel = workers > 1 and len(todo) > 1
        with ProcessPoolExecutor(max_workers=workers) if parallel else contextlib.nullcontext() as pool:
            results = pool.map(_build_one, todo, chunksize=4) if parallel else map(_build_one, todo)
            for image_id, hist in results:
                counts[image_id] = hist
                bar.update()
        bar.close()
        rows = []
        for info in self.coco.images.values():
            hist = counts[info.id]
            row = {
                "image_id": info.id,
                "file_name": info.file_name,
                "height": info.height,
                "width": info.width,
            }
            row["mask"] = str(self.mask_path(info.id).relative_to(self.dir))
            row.update({f"px_{c}": int(hist[c]) for c in range(self.class_map.num_classes)})
            row["px_ignore"] = int(hist[IGNORE_INDEX])
            rows.append(row)
        frame = pd.DataFrame(rows)
        meta = {
            "annotations": str(self.coco.path),
            "sha256": self.coco.digest,
            "classes": list(self.class_map.names),
            "crowd": self.crowd,
            "version": CACHE_VERSION,
        }
        atomic_write_text(self.dir / "cache.json", json.dumps(meta, indent=2))
        atomic_write_csv(self.index_path, frame)
        return frame

    def index(self) -> pd.DataFrame:
        return pd.read_csv(self.index_path)

    def load(self, image_id: int) -> np.ndarray:
        return load_mask(self.mask_path(image_id))


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel mask PNG, with an error naming the file."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise OSError(f"cannot read mask {path} (missing or corrupt)")
    if mask.ndim != 2:
        raise ValueError(f"mask {path} must be single-channel, got shape {mask.shape}")
    return mask
