"""``competition export``:
pack what predict needs from runs (ONNX, weights, postprocess.json) into a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_runs_args, floats


def add(sub: Any) -> None:
    """The ``export`` subparser."""
    p = sub.add_parser(
        "export",
        help="pack what predict needs from runs (+ONNX, weights, postprocess.json) into an offline bundle",
    )
    add_runs_args(p)
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--postprocess", type=Path, default=None, help="postprocess.json to include")
    p.add_argument(
        "--onnx", action="store_true",
        help="also export each fold to model.onnx (dynamic batch and size, checked against eager first)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.runtime import stage_threads
    from ..inference.bundle import bundle_size, export_bundle

    what = "the eager models and ONNX graphs" if args.onnx else "the runs' files"
    print(f"export: {len(args.runs)} run(s) to {args.out}, {what}, {stage_threads()} threads", flush=True)
    manifest = export_bundle(
        args.runs,
        args.out,
        floats(args.weights),
        args.postprocess,
        args.onnx,
        args.overwrite,
        args.allow_partial,
    )
    folds = sum(name.endswith("best.safetensors") for name in manifest["files"])
    size, runs_size = bundle_size(args.out) / 2**20, sum(bundle_size(r) for r in args.runs) / 2**20
    print(
        f"bundle: {args.out} ({len(manifest['runs'])} runs, {folds} folds, {size:.1f} MB; the run folders "
        f"hold {runs_size:.1f} MB)"
    )
    if manifest["onnx"]:
        worst = max(manifest["onnx_max_difference"].values())
        print(f"ONNX: every fold checked against eager, max logit difference {worst:.1e} of the largest")
    return 0
