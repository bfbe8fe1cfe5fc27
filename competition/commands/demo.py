"""``competition demo``: the whole pipeline on a generated synthetic trash dataset (CPU, ~2 min)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add(sub: Any) -> None:
    """The ``demo`` subparser."""
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on a generated synthetic trash dataset (CPU, ~2 min)",
        description="Generate a small synthetic trash COCO dataset, then prepare -> folds (k=3) -> train "
        "each fold (configs/tiny_cpu.yaml) -> OOF evaluation -> predict with TTA -> submission.csv -> "
        "validate.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo_output"), help="output folder (default: ./demo_output)"
    )
    p.add_argument("--images", type=int, default=48, help="synthetic training images")
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs per fold (default: the tiny_cpu config's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--pseudo", action="store_true", help="add one pseudo-label round on the test images (~2x the time)"
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of configs/tiny_cpu.yaml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(
        args.out,
        images=args.images,
        epochs=args.epochs,
        overrides=args.overrides,
        overwrite=args.overwrite,
        pseudo=args.pseudo,
    )
    return 0
