"""``competition``: the pipeline's command line, one subcommand per stage."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from . import commands
from .data.coco import BOOSTCAMP_CLASSES, CocoFormatError


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
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


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless its text already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _class_count(text: str) -> int:
    """``--classes`` of validate: a number, or class names as ``prepare --classes`` takes them."""
    if text.strip().isdigit():
        return int(text)
    names = [n for n in text.split(",") if n.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError(
            f"expected class names (comma-separated) or their number, got {text!r}"
        )
    return len(names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="competition",
        description="Kaggle-style COCO segmentation pipeline on smp_unet3p: prepare -> folds -> train -> "
        "predict -> ensemble -> submit.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>", parser_class=_Parser)

    p = sub.add_parser("prepare", help="COCO -> cached class masks + dataset statistics")
    _add_dataset_args(p)
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="mask cache root (default: DATA_ROOT/.mask_cache)"
    )
    p.add_argument(
        "--crowd", choices=("class", "ignore"), default="class", help="draw iscrowd=1 as its class or as 255"
    )
    p.add_argument("--workers", type=int, default=0, help="processes building masks (0 = all cores)")
    p.add_argument("--out", type=Path, default=None, help="statistics folder (default: CACHE/stats)")
    p.add_argument("--overlays", type=int, default=4, help="number of image/mask overlay PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace existing statistics (reuses the cache)")
    p.set_defaults(func=commands.cmd_prepare)

    p = sub.add_parser("folds", help="multilabel-stratified (grouped) k-fold -> folds CSV")
    _add_dataset_args(p)
    p.add_argument("--out", type=Path, required=True, help="folds CSV to write")
    p.add_argument("--k", type=int, default=5, help="number of folds")
    p.add_argument("--seed", type=int, default=42, help="seed of the fold assignment")
    p.add_argument(
        "--group-by-folder",
        action="store_true",
        help="keep each image folder in one fold (needs at least K folders)",
    )
    p.add_argument(
        "--groups",
        type=Path,
        default=None,
        help="CSV with columns file_name,group: images of one group (e.g. photos of one scene) share a fold",
    )
    p.add_argument(
        "--exclude",
        type=Path,
        default=None,
        help="file names to leave out: a text file (one per line) or a CSV with a file_name column",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folds file")
    p.set_defaults(func=commands.cmd_folds)

    p = sub.add_parser(
        "train",
        help="train fold(s) from a YAML config -> runs/<name>/fold<k>/",
        description="Train one fold or all folds. Overrides are dotted keys, e.g. train.epochs=3 "
        "model.encoder_name=efficientnet-b0 model.params.cgm=false. Multi-GPU: "
        "torchrun --nproc_per_node N -m competition.cli train ...",
    )
    p.add_argument("--config", help="YAML file, or a shipped config's name (e.g. tiny_cpu)")
    p.add_argument(
        "--fold", default=None,
        help="fold number, comma-separated numbers, or 'all' (default: all; with --resume RUN_DIR: the folds "
        "the run was started for)",
    )  # fmt: skip
    p.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
        help="continue from each fold's last.ckpt. With RUN_DIR (runs/<name>) the run's own config.yaml is "
        "used: no --config, and overrides only for train.epochs (larger: extends the run) and settings that "
        "keep the resume exact (train.workers, device, threads, progress, loggers, val_batch_size, "
        "checkpoint_every, patience, time_limit)",
    )  # fmt: skip
    p.add_argument(
        "--init-from", type=Path, default=None, metavar="RUN_DIR|FILE",
        help="start from another run's best weights, fold k from its fold k (same folds file, checked; "
        "train.init_any_folds=true accepts another), or from one .safetensors file (train.init_from)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="start over in an existing run directory")
    p.add_argument("--data-root", type=Path, default=None, help="images folder: the same as data.root=DIR")
    p.add_argument("--annotations", type=Path, default=None, help="COCO json: the same as data.annotations=J")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser(
        "predict",
        help="ensemble fold checkpoints (+TTA, sliding window) on test images -> validated submission CSV",
    )
    _add_prediction_inputs(p, "test COCO json (only 'images' is needed), e.g. DATA/test.json", folder=True)
    p.add_argument("--out", required=True, type=Path, help="submission CSV to write")
    _add_inference_args(p)
    _add_submission_args(p)
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
    p.set_defaults(func=commands.cmd_predict)

    p = sub.add_parser(
        "export",
        help="pack what predict needs from runs (+ONNX, weights, postprocess.json) into an offline bundle",
    )
    _add_runs_args(p)
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--postprocess", type=Path, default=None, help="postprocess.json to include")
    p.add_argument(
        "--onnx", action="store_true",
        help="also export each fold to model.onnx (dynamic batch and size, checked against eager first)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser(
        "pseudo",
        help="pseudo-label unlabelled (test) images with the fold/run ensemble + TTA -> a set for data.extra",
        description="Predict every image of --test with the ensemble of every fold of --runs (+TTA); each "
        "pixel gets its arg-max class, or 255 (ignored in training) where the top probability is below "
        "--threshold. Writes OUT/pseudo.json, OUT/masks/*.png and OUT/coverage.csv. Train the next round "
        "with data.extra=[OUT]: the set joins the training split of every fold, never validation.",
    )
    _add_prediction_inputs(p, "COCO json of the images to pseudo-label")
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
    _add_inference_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=commands.cmd_pseudo)

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
    _add_allow_partial(p)
    _add_submission_args(p)
    p.add_argument(
        "--postprocess", type=Path, default=None, help="postprocess.json of evaluate --tune-postprocess"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=commands.cmd_ensemble)

    p = sub.add_parser(
        "validate", help="check a submission CSV against the test set; exit 1 listing problems"
    )
    p.add_argument("submission", type=Path)
    p.add_argument("--test", required=True, type=Path, help="test COCO json (expected ids and order)")
    p.add_argument(
        "--classes", type=_class_count, default=len(BOOSTCAMP_CLASSES), metavar="NAMES|N",
        help="the class names, comma-separated as for prepare --classes (or just their number)",
    )  # fmt: skip
    p.add_argument(
        "--no-background", action="store_true",
        help="the runs had no background class (data.background: none): rle rows of class 0 are valid",
    )  # fmt: skip
    _add_submission_args(p)
    p.set_defaults(func=commands.cmd_validate)

    p = sub.add_parser(
        "evaluate",
        help="out-of-fold mIoU per fold, per run and of soft/hard votes; weight search and post-processing "
        "tuning with nested scores",
    )
    _add_runs_args(p)
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
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser(
        "audit", help="rank training images by OOF disagreement with their labels -> audit.csv + gallery"
    )
    _add_runs_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (audit.csv, gallery/)")
    p.add_argument("--gallery", type=int, default=24, help="panels of the N most suspicious images")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=commands.cmd_audit)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML report of runs: config, curves, OOF scores, per-class IoU, confusion "
        "matrix, worst OOF images, submission class distribution",
    )
    _add_runs_args(p)
    p.add_argument(
        "--weights-file", type=Path, default=None,
        help="weights.json of evaluate --save-weights: the vote of the submission (matched by run name)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write")
    p.add_argument("--submission", type=Path, default=None, help="a submission CSV to compare with training")
    _add_submission_args(p)
    p.add_argument("--worst", type=int, default=8, help="show the N worst OOF images")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=commands.cmd_report)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on a generated synthetic trash dataset (CPU, ~2 min)",
        description="Generate a small synthetic trash COCO dataset, then prepare -> folds (k=3) -> train "
        "each fold (configs/tiny_cpu.yaml) -> OOF evaluation -> predict with TTA -> submission.csv -> "
        "validate.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo_output"), help="output folder (default: ./demo_output)"
    )
    p.add_argument("--images", type=int, default=48, help="synthetic training images")
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs per fold (default: the tiny_cpu config's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--pseudo", action="store_true", help="add one pseudo-label round on the test images (~2x the time)"
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of configs/tiny_cpu.yaml")
    p.set_defaults(func=commands.cmd_demo)
    for action in sub._choices_actions:  # `competition STAGE --help` opens with what the stage does
        stage = sub.choices[action.dest]
        stage.description = stage.description or (action.help[:1].upper() + action.help[1:] + ".")
    return parser


def _add_allow_partial(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-partial", action="store_true",
        help="use runs whose folds did not all finish (or lack folds of their folds file); the output "
        "records it. Without it such runs are refused, naming the folds",
    )  # fmt: skip


def _add_prediction_inputs(p: argparse.ArgumentParser, test_help: str, folder: bool = False) -> None:
    """``--runs``, ``--weights``, ``--data-root`` and ``--test``; with ``folder``, ``--images DIR`` instead of
    the last two (every image under DIR, no json)."""
    _add_allow_partial(p)
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


def _add_runs_args(p: argparse.ArgumentParser) -> None:
    _add_allow_partial(p)
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="run dirs trained on the same folds")
    p.add_argument("--weights", default=None, help="comma-separated weight per run")


def _add_inference_args(p: argparse.ArgumentParser) -> None:
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


def _add_submission_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("boostcamp", "rle"), default="boostcamp", help="submission format")
    p.add_argument("--size", type=int, default=256, help="mask side in the CSV (0: native size)")


OOM_HINTS = {
    "train": "lower train.batch_size (keep the effective batch with train.accum_steps), set train.amp=bf16, "
    "train a smaller augment.size crop, or a lighter model (model.params.decoder_cat_channels=32)",
    "predict": "lower --batch-size, use fewer TTA views/scales, --amp bf16, or --tile 512 (sliding window) "
    "for large images",
}


_SHOWN: set[str] = set()  # warning lines already printed by this command


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as short ``warning: ...`` lines, one per line of the message (no source path, no code), each
    once per command (a stage that opens the same runs twice warns once)."""
    for text in str(message).splitlines():
        if text.strip() and text.strip() not in _SHOWN:
            _SHOWN.add(text.strip())
            print(f"warning: {text.strip()}", file=sys.stderr)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a killed job, a kernel's time limit) stops like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may come after flags: `train --resume runs/a train.epochs=20 --fold 1 key=value`
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:  # `&` and nohup start jobs with SIGINT ignored: kill -INT must still stop them cleanly
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _terminate)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    _SHOWN.clear()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            return _run(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace) -> int:
    # imported here, not at the top: `competition --help` and parse errors answer without loading torch
    import torch

    from smp_unet3p.encoders import EncoderWeightsError

    from .checkpoint import CheckpointError
    from .io import OutputExistsError
    from .train import NonFiniteLossError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # `train` says where it stopped and how to continue (commands.cmd_train)
        print(f"competition {args.command}: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as exc:
        print(
            f"competition {args.command}: error: out of memory: {str(exc).splitlines()[0]}", file=sys.stderr
        )
        print(f"hint: {OOM_HINTS.get(args.command, OOM_HINTS['train'])}", file=sys.stderr)
        return 1
    except ImportError as exc:  # an optional extra not installed: its message says what to install
        print(f"competition {args.command}: error: {exc}", file=sys.stderr)
        if not exc.__cause__ and getattr(exc, "name", None):
            print(f"hint: install {exc.name} (the package's extras: see README, Install)", file=sys.stderr)
        return 1
    except (
        CocoFormatError,
        OutputExistsError,
        FileNotFoundError,
        ValueError,
        CheckpointError,
        NonFiniteLossError,
        OSError,
        EncoderWeightsError,
    ) as exc:  # the expected errors: their message names the file, flag or key at fault
        print(f"competition {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
