"""``competition ensemble``:
soft (weighted, per-class) or hard vote of saved probabilities -> a validated CSV."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_allow_partial, add_submission_args, floats


def add(sub: Any) -> None:
    """The ``ensemble`` subparser."""
    p = sub.add_parser(
        "ensemble",
        help="soft (weighted, per-class) or hard vote of saved probabilities (predict --save-probs), "
        "optional post-processing -> CSV",
    )
    p.add_argument(
        "--probs", nargs="+", required=True, type=Path, help=".npz files from predict --save-probs"
    )
    p.add_argument("--weights", default=None, help="comma-separated weight per file (default: equal)")
    p.add_argument(
        "--weights-file",
        type=Path,
        default=None,
        help="weights.json of evaluate --save-weights (per run or per class), matched to the files by the "
        "run that made each (their provenance), in any order",
    )
    p.add_argument(
        "--vote", choices=("soft", "hard"), default="soft",
        help="soft: weighted mean of probabilities; hard: majority of the files' argmaxes (ties: larger "
        "summed probability)",
    )  # fmt: skip
    p.add_argument("--test", required=True, type=Path, help="test COCO json (row order and ids)")
    p.add_argument("--out", required=True, type=Path, help="submission CSV to write")
    add_allow_partial(p)
    add_submission_args(p)
    p.add_argument(
        "--postprocess", type=Path, default=None, help="postprocess.json of evaluate --tune-postprocess"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.ensemble import ensemble_probs

    path = ensemble_probs(
        args.probs,
        args.test,
        args.out,
        weights=floats(args.weights),
        weights_file=args.weights_file,
        vote=args.vote,
        fmt=args.format,
        size=args.size or None,
        postprocess=args.postprocess,
        overwrite=args.overwrite,
        allow_partial=args.allow_partial,
    )
    print(f"{args.vote} vote of {len(args.probs)} probability files -> {path} (validated)")
    return 0
