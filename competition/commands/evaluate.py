"""``competition evaluate``:
out-of-fold mIoU per fold, run and vote; weight search and tuning with nested scores."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_runs_args, floats


def add(sub: Any) -> None:
    """The ``evaluate`` subparser."""
    p = sub.add_parser(
        "evaluate",
        help="out-of-fold mIoU per fold, per run and of soft/hard votes; weight search and post-processing "
        "tuning with nested scores",
    )
    add_runs_args(p)
    p.add_argument("--search-weights", action="store_true", help="search run weights on OOF mIoU")
    p.add_argument(
        "--per-class", action="store_true", help="with --search-weights: one weight per run and class"
    )
    p.add_argument(
        "--search", choices=("auto", "grid", "greedy"), default="auto",
        help="grid: every weight vector --step apart; greedy: forward selection of 1/step picks (cost "
        "linear in runs); auto (default): the grid up to 300 vectors (4 runs at step 0.1), else greedy",
    )  # fmt: skip
    p.add_argument("--step", type=float, default=0.1, help="grid step (greedy: 1/step picks)")
    p.add_argument(
        "--sample-pixels", type=int, default=2048,
        help="labelled pixels per image the weight search scores (stratified by class, weighted back to "
        "the image's class counts; 0: every pixel, exact but slow at competition size)",
    )  # fmt: skip
    p.add_argument(
        "--save-weights", type=Path, default=None, help="write the searched weights (weights.json)"
    )
    p.add_argument(
        "--tune-postprocess", type=Path, default=None, metavar="FILE",
        help="tune per-class min-area / hole filling on OOF and write them to FILE (postprocess.json)",
    )  # fmt: skip
    p.add_argument(
        "--tune-crf", type=Path, default=None, metavar="FILE",
        help="choose a dense-CRF setting (or none) on OOF with the images, nested score per fold, and write "
        "it to FILE (a postprocess.json for predict --postprocess; needs pydensecrf2, the [crf] extra)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing weights / postprocess files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.runtime import stage_threads
    from ..oof.evaluate import evaluate

    print(f"evaluate: {len(args.runs)} run(s), {stage_threads()} threads", flush=True)
    found = evaluate(
        args.runs, floats(args.weights), args.allow_partial, args.search if args.search_weights else None,
        args.step, args.per_class, args.sample_pixels or None, args.save_weights, args.tune_postprocess,
        args.tune_crf, args.overwrite,
    )  # fmt: skip
    if found.search is not None:
        search = found.search
        print(_table(search.table.head(10)))
        chosen = [round(float(w), 3) for w in search.weights]
        kind = "per-class weights" if args.per_class else f"weights {chosen}"
        print(
            f"best {kind} ({search.method} search): OOF mIoU {search.in_sample:.4f} in-sample (on the images "
            f"they were chosen on: optimistic); {search.nested:.4f} nested (each fold scored with weights "
            "chosen on the other folds): expect the latter"
        )
        if args.save_weights:
            print(f"weights: {args.save_weights}")
    print(_table(found.scores))
    if found.tuned is not None:
        tuned, pp = found.tuned, found.tuned.postprocess
        print(f"post-processing (min_area as a fraction of the image): min_area {pp.min_area}, fill_holes "
              f"{sorted(pp.fill_holes)}")  # fmt: skip
        print(f"OOF mIoU: plain {tuned.baseline:.4f}, post-processed {tuned.in_sample:.4f} in-sample, "
              f"{tuned.nested:.4f} nested -> {args.tune_postprocess}")  # fmt: skip
    if found.crf is not None:
        _print_crf(found.crf, args.tune_crf)
    return 0


def _table(frame: Any) -> str:
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def _print_crf(tuned: Any, out: Path) -> None:
    import numpy as np

    for row in tuned.table:
        print(f"  CRF {row['setting']}: OOF mIoU {row['oof_miou']:.4f}")
    if tuned.fold_scores:
        gains = np.array([nested - plain for plain, nested in tuned.fold_scores.values()])
        spread = f"mean {gains.mean():+.4f} ± {gains.std(ddof=1):.4f}"
        print(f"nested gain per fold: {np.round(gains, 4).tolist()} ({spread})")
    chosen = "none (none beat the plain arg-max)" if tuned.settings is None else vars(tuned.settings)
    print(
        f"dense CRF: {chosen}; OOF mIoU plain {tuned.baseline:.4f}, with it {tuned.in_sample:.4f} in-sample, "
        f"{tuned.nested:.4f} nested (NaN with one fold) -> {out}"
    )
