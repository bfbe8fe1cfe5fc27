"""The ``prepare`` stage: COCO annotations -> cached class masks, dataset statistics and overlay panels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.io import check_writable
from .classes import ClassMap, read_merge_map
from .coco import CocoIndex, MaskCache, load_coco
from .images import check_images


def class_map_of(
    annotations: str | os.PathLike,
    data_root: str | os.PathLike | None,
    classes: str | None = None,
    merge_map: str | os.PathLike | None = None,
    no_background: bool = False,
) -> tuple[CocoIndex, ClassMap]:
    """The COCO index of ``annotations`` and its class map: ``classes`` (comma-separated names, the first
    the background unless ``no_background``) or the default list, ``merge_map`` folding categories."""
    coco = load_coco(annotations, data_root)
    names = [n.strip() for n in classes.split(",")] if classes else None
    merge = read_merge_map(merge_map) if merge_map else None
    if no_background and names is None:
        raise ValueError("--no-background needs --classes (the class names, none of them background)")
    return coco, ClassMap.build(coco.categories, names, merge, str(annotations), not no_background)


def prepare(
    annotations: str | os.PathLike,
    data_root: str | os.PathLike,
    classes: str | None = None,
    merge_map: str | os.PathLike | None = None,
    no_background: bool = False,
    cache_dir: str | os.PathLike | None = None,
    crowd: str = "class",
    workers: int = 0,
    out: str | os.PathLike | None = None,
    overlays: int = 4,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the mask cache (``cache_dir``, default ``DATA_ROOT/.mask_cache``) and write the statistics and
    ``overlays`` panels to ``out`` (default ``CACHE/stats``). The images the json names are checked first
    (more than half missing is an error, before any folder is made); existing statistics need
    ``overwrite``. Returns what was made."""
    from .panels import write_overlays
    from .stats import write_statistics

    coco, class_map = class_map_of(annotations, data_root, classes, merge_map, no_background)
    names = [info.file_name for info in coco.images.values()]
    check_images(data_root, names, str(annotations), "--data-root", allowed_missing=0.5)
    cache = MaskCache(coco, class_map, cache_dir or Path(data_root) / ".mask_cache", crowd=crowd)
    out = Path(out) if out else cache.dir / "stats"
    check_writable(out / "class_stats.csv", overwrite)
    index = cache.build(workers=workers)
    stats = write_statistics(cache, out)
    panels = write_overlays(cache, data_root, out, count=overlays)
    return {"images": len(index), "cache": cache.dir, "issues": dict(coco.issues), "stats": stats,
            "out": out, "overlays": panels}  # fmt: skip
