"""``competition folds``: multilabel-stratified (grouped) k-fold -> folds CSV."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_dataset_args


def add(sub: Any) -> None:
    """The ``folds`` subparser."""
    p = sub.add_parser("folds", help="multilabel-stratified (grouped) k-fold -> folds CSV")
    add_dataset_args(p)
    p.add_argument("--out", type=Path, required=True, help="folds CSV to write")
    p.add_argument("--k", type=int, default=5, help="number of folds")
    p.add_argument("--seed", type=int, default=42, help="seed of the fold assignment")
    p.add_argument(
        "--group-by-folder",
        action="store_true",
        help="keep each image folder in one fold (needs at least K folders)",
    )
    p.add_argument(
        "--groups",
        type=Path,
        default=None,
        help="CSV with columns file_name,group: images of one group (e.g. photos of one scene) share a fold",
    )
    p.add_argument(
        "--exclude",
        type=Path,
        default=None,
        help="file names to leave out: a text file (one per line) or a CSV with a file_name column",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folds file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.folds import folds_file

    made = folds_file(
        args.annotations, args.data_root, args.out, args.k, args.seed, args.group_by_folder, args.groups,
        args.exclude, args.classes, args.merge_map, args.no_background, args.overwrite,
    )  # fmt: skip
    if made["excluded"]:
        print(f"left out {len(made['excluded'])} images listed in {args.exclude}")
    print(made["summary"].to_string())
    print(f"max per-class deviation of fold frequency from overall: {made['error']:.4f}")
    print(f"folds: {args.out}")
    return 0
