"""``competition pseudo``:
pseudo-label unlabelled images with the fold / run ensemble -> a set for data.extra."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_inference_args, add_prediction_inputs, floats, inference_options, loading


def add(sub: Any) -> None:
    """The ``pseudo`` subparser."""
    p = sub.add_parser(
        "pseudo",
        help="pseudo-label unlabelled (test) images with the fold/run ensemble + TTA -> a set for data.extra",
        description="Predict every image of --test with the ensemble of every fold of --runs (+TTA); each "
        "pixel gets its arg-max class, or 255 (ignored in training) where the top probability is below "
        "--threshold. Writes OUT/pseudo.json, OUT/masks/*.png and OUT/coverage.csv. Train the next round "
        "with data.extra=[OUT]: the set joins the training split of every fold, never validation.",
    )
    add_prediction_inputs(p, "COCO json of the images to pseudo-label")
    p.add_argument("--out", required=True, type=Path, help="output folder of the pseudo-label set")
    p.add_argument(
        "--threshold", type=float, default=0.9, help="min top-class probability to keep a pixel (default 0.9)"
    )
    p.add_argument(
        "--class-share", type=float, default=None, metavar="P",
        help="class-balanced thresholds (CBST): also keep each class's most confident share P of the pixels "
        "predicted as it over the set, so rare classes are not all ignored at --threshold (e.g. 0.5)",
    )  # fmt: skip
    p.add_argument(
        "--pooled", action="store_true",
        help="one set labelled by every fold model (for a model trained on all images). Default: "
        "fold-matched labels (fold k's student learns from the runs' fold-k models, which never saw fold "
        "k's validation images), so OOF scores stay honest",
    )  # fmt: skip
    add_inference_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.pseudo import coverage_summary, make_pseudo

    summary = make_pseudo(
        args.runs,
        args.data_root,
        args.test,
        args.out,
        threshold=args.threshold,
        weights=floats(args.weights),
        opts=inference_options(args),
        pooled=args.pooled,
        allow_partial=args.allow_partial,
        class_share=args.class_share,
        **loading(args),
    )
    table = coverage_summary(summary["coverage"], summary["classes"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"{summary['images']} images pseudo-labelled -> {summary['dir']} (coverage.csv per image). "
        f"Train on them with data.extra=[{summary['dir']}]"
    )
    return 0
