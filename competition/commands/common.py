"""What the commands share: argument groups (dataset, runs, inference, submission) and the small readers of
their values."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data.classes import BOOSTCAMP_CLASSES


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root",
        required=True,
        type=Path,
        help="folder holding the images (file names are relative to it)",
    )
    p.add_argument("--annotations", required=True, type=Path, help="COCO json, e.g. DATA/train_all.json")
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names, index = class id, first = background "
        f"(default: {', '.join(BOOSTCAMP_CLASSES)}; with --merge-map: Background + the map's classes)",
    )
    p.add_argument(
        "--merge-map",
        type=Path,
        default=None,
        help="CSV category_name,class_name folding categories into classes",
    )
    p.add_argument(
        "--no-background",
        action="store_true",
        help="no class is background (as data.background: none): unannotated pixels are ignored (255) and "
        "every class of --classes is a real one",
    )


def class_count(text: str) -> int:
    """``--classes`` of validate: a number, or class names as ``prepare --classes`` takes them."""
    if text.strip().isdigit():
        return int(text)
    names = [n for n in text.split(",") if n.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError(
            f"expected class names (comma-separated) or their number, got {text!r}"
        )
    return len(names)


def add_allow_partial(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-partial", action="store_true",
        help="use runs whose folds did not all finish (or lack folds of their folds file); the output "
        "records it. Without it such runs are refused, naming the folds",
    )  # fmt: skip


def add_prediction_inputs(p: argparse.ArgumentParser, test_help: str, folder: bool = False) -> None:
    """``--runs``, ``--weights``, ``--data-root`` and ``--test``; with ``folder``, ``--images DIR`` instead of
    the last two (every image under DIR, no json)."""
    add_allow_partial(p)
    p.add_argument(
        "--runs", nargs="+", required=not folder, type=Path, help="run dirs (every fold) or fold dirs"
    )
    if folder:  # predict: a bundle instead of runs
        p.add_argument(
            "--bundle", type=Path, default=None,
            help="instead of --runs: a bundle of competition export (hashes checked; its weights and "
            "postprocess.json used unless --weights / --postprocess are given)",
        )  # fmt: skip
        p.add_argument(
            "--engine", choices=("torch", "onnxruntime"), default="torch",
            help="run the eager models, or each fold's model.onnx (a bundle exported with --onnx)",
        )  # fmt: skip
    p.add_argument("--weights", default=None, help="comma-separated weight per run (default: equal)")
    p.add_argument(
        "--data-root", required=not folder, type=Path, help="folder the test file names are relative to"
    )
    p.add_argument("--test", required=not folder, type=Path, help=test_help)
    if folder:
        p.add_argument(
            "--images", type=Path, default=None, metavar="DIR",
            help="instead of --data-root and --test: every image under DIR, ids = paths relative to DIR",
        )  # fmt: skip


def add_runs_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    add_allow_partial(p)
    p.add_argument(
        "--runs", nargs="+", required=required, type=Path, help="run dirs trained on the same folds"
    )
    p.add_argument("--weights", default=None, help="comma-separated weight per run")


def add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta", default="hflip", help="views: hflip,vflip,rot90,rot180 or 'none' (default: hflip)"
    )
    p.add_argument("--scales", default="1.0", help="comma-separated TTA scales, e.g. 0.75,1.0,1.25")
    p.add_argument(
        "--tile", type=int, default=None, help="sliding-window tile for larger images (default: off)"
    )
    p.add_argument("--overlap", type=int, default=128, help="sliding-window overlap in pixels")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding the next batch")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype on GPU")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPU)")


def add_submission_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("boostcamp", "rle"), default="boostcamp", help="submission format")
    p.add_argument("--size", type=int, default=256, help="mask side in the CSV (0: native size)")


def floats(text: str | None) -> list[float] | None:
    """``"0.6,0.4"`` -> ``[0.6, 0.4]`` (``None`` for no text)."""
    return [float(x) for x in text.split(",")] if text else None


def inference_options(args: argparse.Namespace) -> Any:
    """The TTA, sliding-window and precision options of the inference commands."""
    from ..inference.predictor import InferenceOptions, parse_tta

    return InferenceOptions(
        views=parse_tta(args.tta),
        scales=floats(args.scales) or [1.0],
        tile=args.tile,
        overlap=args.overlap,
        amp=args.amp,
        channels_last=args.channels_last,
    )


def loading(args: argparse.Namespace) -> dict[str, Any]:
    """The batch, worker, device and overwrite arguments of the inference commands."""
    return {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": device(args.device),
        "overwrite": args.overwrite,
    }


def device(name: str) -> str:
    """The torch device ``name`` resolves to (``auto``: CUDA when available), as text."""
    from ..core.runtime import resolve_device

    return str(resolve_device(name))


def test_images(test: Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """File names of a test COCO json in its order (the submission's expected ``image_id`` column) and each
    image's ``(height, width)``."""
    from ..data.coco import load_coco

    images = load_coco(test, None).images.values()
    return [i.file_name for i in images], {i.file_name: (i.height, i.width) for i in images}


