"""``competition report``:
one self-contained HTML report of runs (curves, OOF scores, confusion, worst images)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_runs_args, add_submission_args, floats


def add(sub: Any) -> None:
    """The ``report`` subparser."""
    p = sub.add_parser(
        "report",
        help="one self-contained HTML report of runs: config, curves, OOF scores, per-class IoU, confusion "
        "matrix, worst OOF images, submission class distribution",
    )
    add_runs_args(p)
    p.add_argument(
        "--weights-file", type=Path, default=None,
        help="weights.json of evaluate --save-weights: the vote of the submission (matched by run name)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write")
    p.add_argument("--submission", type=Path, default=None, help="a submission CSV to compare with training")
    add_submission_args(p)
    p.add_argument("--worst", type=int, default=8, help="show the N worst OOF images")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..oof.report import build_report

    weights = floats(args.weights)
    if args.weights_file:
        from ..predictions.weights_file import weights_for_runs

        weights = weights_for_runs(args.weights_file, args.runs)
    path = build_report(
        args.runs, args.out, args.submission, args.format, args.size or None, args.worst, args.overwrite,
        weights=weights, allow_partial=args.allow_partial,
    )  # fmt: skip
    print(f"report: {path.resolve()} (self-contained; open it in a browser: file://{path.resolve()})")
    return 0
