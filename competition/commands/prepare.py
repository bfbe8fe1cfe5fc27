"""``competition prepare``: COCO -> cached class masks + dataset statistics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_dataset_args


def add(sub: Any) -> None:
    """The ``prepare`` subparser."""
    p = sub.add_parser("prepare", help="COCO -> cached class masks + dataset statistics")
    add_dataset_args(p)
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="mask cache root (default: DATA_ROOT/.mask_cache)"
    )
    p.add_argument(
        "--crowd", choices=("class", "ignore"), default="class", help="draw iscrowd=1 as its class or as 255"
    )
    p.add_argument("--workers", type=int, default=0, help="processes building masks (0 = all cores)")
    p.add_argument("--out", type=Path, default=None, help="statistics folder (default: CACHE/stats)")
    p.add_argument("--overlays", type=int, default=4, help="number of image/mask overlay PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace existing statistics (reuses the cache)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare

    made = prepare(
        args.annotations, args.data_root, args.classes, args.merge_map, args.no_background, args.cache_dir,
        args.crowd, args.workers, args.out, args.overlays, args.overwrite,
    )  # fmt: skip
    print(f"masks: {made['images']} images in {made['cache']}")
    if made["issues"]:
        print(f"annotation problems: {made['issues']} (details above)")
    print(made["stats"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    out, panels = made["out"], len(made["overlays"])
    print(f"statistics: {out / 'class_stats.csv'}, {out / 'class_stats.png'}, {panels} overlays")
    return 0
