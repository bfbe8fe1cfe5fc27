"""``competition validate``: check a submission CSV against the test set; exit 1 listing problems."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..data.classes import BOOSTCAMP_CLASSES
from .common import add_submission_args, class_count, test_images


def add(sub: Any) -> None:
    """The ``validate`` subparser."""
    p = sub.add_parser(
        "validate", help="check a submission CSV against the test set; exit 1 listing problems"
    )
    p.add_argument("submission", type=Path)
    p.add_argument("--test", required=True, type=Path, help="test COCO json (expected ids and order)")
    p.add_argument(
        "--classes", type=class_count, default=len(BOOSTCAMP_CLASSES), metavar="NAMES|N",
        help="the class names, comma-separated as for prepare --classes (or just their number)",
    )  # fmt: skip
    p.add_argument(
        "--no-background", action="store_true",
        help="the runs had no background class (data.background: none): rle rows of class 0 are valid",
    )  # fmt: skip
    add_submission_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..predictions.submission import validate_submission

    ids, shapes = test_images(args.test)
    background = None if args.no_background else 0
    problems = validate_submission(
        args.submission,
        ids,
        args.classes,
        args.format,
        args.size or None,
        shapes=shapes,
        background=background,
    )
    if problems:
        print(f"{args.submission}: INVALID, {len(problems)} problem(s) (first shown):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{args.submission}: valid ({args.format}, {args.classes} classes)")
    return 0
