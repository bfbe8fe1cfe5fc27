"""``competition audit``:
rank training images by OOF disagreement with their labels -> audit.csv and a gallery."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_runs_args, floats


def add(sub: Any) -> None:
    """The ``audit`` subparser."""
    p = sub.add_parser(
        "audit", help="rank training images by OOF disagreement with their labels -> audit.csv + gallery"
    )
    add_runs_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (audit.csv, gallery/)")
    p.add_argument("--gallery", type=int, default=24, help="panels of the N most suspicious images")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..oof.audit import run_audit

    table, gallery = run_audit(
        args.runs, args.out, floats(args.weights), args.gallery, args.overwrite, args.allow_partial
    )
    shown = table.head(10)[["rank", "file_name", "fold", "score", "pixel_error", "top_confusion"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"{len(table)} images ranked -> {Path(args.out) / 'audit.csv'}; {len(gallery)} panels in "
        f"{Path(args.out) / 'gallery'}. Put the file names of wrong labels in an exclude list "
        "(folds --exclude FILE, or data.exclude=FILE) and retrain."
    )
    return 0
