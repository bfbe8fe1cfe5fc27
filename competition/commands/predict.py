"""``competition predict``:
the fold / run ensemble (+TTA, sliding window) on test images -> a validated submission."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    add_inference_args,
    add_prediction_inputs,
    add_submission_args,
    floats,
    inference_options,
    loading,
)


def add(sub: Any) -> None:
    """The ``predict`` subparser."""
    p = sub.add_parser(
        "predict",
        help="ensemble fold checkpoints (+TTA, sliding window) on test images -> validated submission CSV",
    )
    add_prediction_inputs(p, "test COCO json (only 'images' is needed), e.g. DATA/test.json", folder=True)
    p.add_argument("--out", required=True, type=Path, help="submission CSV to write")
    add_inference_args(p)
    add_submission_args(p)
    p.add_argument("--save-probs", type=Path, default=None, help="also save float16 probabilities (.npz)")
    p.add_argument(
        "--probs-size", type=int, default=None,
        help="side of the saved probabilities (default: as --size; 0: native)",
    )  # fmt: skip
    p.add_argument("--overlays", type=int, default=4, help="overlay PNGs of the first N predictions")
    p.add_argument(
        "--postprocess", type=Path, default=None, help="postprocess.json of evaluate --tune-postprocess"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.config import ConfigError
    from ..inference.predict import predict

    given = [args.data_root is not None, args.test is not None]
    if (args.images is not None and any(given)) or (args.images is None and not all(given)):
        raise ConfigError("give --images DIR, or --data-root and --test (not both)")
    runs, weights, postprocess = args.runs, floats(args.weights), args.postprocess
    if (runs is None) == (args.bundle is None):
        raise ConfigError("give --runs or --bundle (one of them)")
    if args.bundle is not None:
        from ..inference.bundle import read_bundle

        bundle = read_bundle(args.bundle)
        runs, weights = bundle.runs, weights or bundle.weights
        postprocess = postprocess or bundle.postprocess
    summary = predict(
        runs,
        args.images or args.data_root,
        args.images or args.test,
        args.out,
        weights=weights,
        opts=inference_options(args),
        fmt=args.format,
        size=args.size or None,
        save_probs=args.save_probs,
        probs_size=(args.size if args.probs_size is None else args.probs_size) or None,
        overlays=args.overlays,
        postprocess=postprocess,
        allow_partial=args.allow_partial,
        engine=args.engine,
        **loading(args),
    )
    print(
        f"{summary['images']} images x {summary['models']} models x {summary['views']} views in "
        f"{summary['seconds']:.1f}s -> {summary['submission']} (validated)"
    )
    if summary["probs"]:
        print(f"probabilities: {summary['probs']}")
    return 0
