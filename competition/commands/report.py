"""``competition report``:
one self-contained HTML report of runs (curves, OOF scores, confusion, worst images) and/or of a sweep's
study (trials, history, parameter importance)."""

from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import Any

from .common import add_runs_args, add_submission_args, floats


def add(sub: Any) -> None:
    """The ``report`` subparser."""
    p = sub.add_parser(
        "report",
        help="one self-contained HTML report of runs: config, curves, OOF scores, per-class IoU, confusion "
        "matrix, worst OOF images, submission class distribution; and/or of a sweep's study (--study)",
    )
    add_runs_args(p, required=False)
    p.add_argument(
        "--study", default=None,
        help="a competition sweep study: its trials (state, score, epochs, parameters, why failed or "
        "pruned), history and the parameters' importance",
    )  # fmt: skip
    p.add_argument("--storage", default=None, help="with --study: the sweep's --storage URL, if it gave one")
    p.add_argument(
        "--study-dir", type=Path, default=Path("runs"),
        help="with --study and no --storage: the runs folder holding <study>/study.db (default: runs)",
    )  # fmt: skip
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
    from ..core.config import ConfigError
    from ..core.io import check_writable

    if not (args.runs or args.study):
        raise ConfigError("give --runs RUN [RUN ...] and/or --study NAME")
    check_writable(args.out, args.overwrite)  # before any work (build_report checks it again: a stat)
    extra = []
    if args.study:
        from ..train.trials import study_section

        extra = study_section(args.study, args.storage, args.study_dir)
    if args.runs:
        path = _run_report(args, extra)
    else:
        from ..core.html import write_page

        title = f"Sweep report: {args.study}"
        path = write_page(args.out, title, [f"<h1>{html.escape(title)}</h1>", *extra])
    print(f"report: {path.resolve()} (self-contained; open it in a browser: file://{path.resolve()})")
    return 0


def _run_report(args: argparse.Namespace, extra: list[str]) -> Path:
    from ..oof.report import build_report

    weights = floats(args.weights)
    if args.weights_file:
        from ..predictions.weights_file import weights_for_runs

        weights = weights_for_runs(args.weights_file, args.runs)
    return build_report(
        args.runs, args.out, args.submission, args.format, args.size or None, args.worst, args.overwrite,
        weights=weights, allow_partial=args.allow_partial, extra=extra,
    )  # fmt: skip
