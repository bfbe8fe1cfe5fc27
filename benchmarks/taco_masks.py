"""Rasterise all of TACO (1500 images, 4784 polygons, full resolution) through the mask cache, then compare
one epoch of reading cached masks with one epoch of rebuilding them with plain pycocotools.

    python benchmarks/taco_masks.py [--data ../shared/data/taco] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from competition.data.classes import ClassMap, read_merge_map
from competition.data.coco import MaskCache, load_coco


def plain_pycocotools_epoch(coco: COCO, category_to_class: dict[int, int]) -> int:
    """What a training loop without a cache does per epoch: annToMask for every annotation, composed."""
    checksum = 0
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        for ann in sorted(coco.imgToAnns[image_id], key=lambda a: -a["area"]):
            mask[coco.annToMask(ann) > 0] = category_to_class[ann["category_id"]]
        checksum += int(mask[::97, ::97].sum())
    return checksum


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "taco"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    ann_file = args.data / "annotations.json"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_coco(ann_file)
    class_map = ClassMap.build(index.categories, merge_map=read_merge_map(args.data / "map_10.csv"))
    with tempfile.TemporaryDirectory() as tmp:
        cache = MaskCache(index, class_map, tmp)
        start = time.perf_counter()
        cache.build(workers=args.workers, progress=False)
        build = time.perf_counter() - start
        megapixels = sum(i.height * i.width for i in index.images.values()) / 1e6

        start = time.perf_counter()
        cached_sum = sum(int(cache.load(i)[::97, ::97].sum()) for i in index.images)
        cached_epoch = time.perf_counter() - start

        coco = COCO(str(ann_file))
        start = time.perf_counter()
        plain_sum = plain_pycocotools_epoch(coco, dict(class_map.category_to_class))
        plain_epoch = time.perf_counter() - start

    annotations = sum(map(len, index.annotations.values()))
    print(f"images {len(index.images)}, annotations {annotations}, {megapixels:.0f} Mpx")
    print(f"cache build ({args.workers} workers): {build:.1f} s")
    print(f"cached epoch (read masks):            {cached_epoch:.1f} s")
    print(f"plain pycocotools epoch (rebuild):    {plain_epoch:.1f} s")
    print(f"cached epoch speed-up: {plain_epoch / cached_epoch:.1f}x")
    if cached_sum != plain_sum:
        print(f"note: masks differ in overlap order only (checksums {cached_sum} vs {plain_sum})")


if __name__ == "__main__":
    main()
