"""``competition``: the pipeline's command line, one subcommand per stage."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .data.coco import BOOSTCAMP_CLASSES, ClassMap, CocoFormatError, MaskCache, load_coco, read_merge_map
from .io import OutputExistsError, check_writable
from .train import NonFiniteLossError


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


def _class_map(args: argparse.Namespace):
    coco = load_coco(args.annotations, args.data_root)
    names = [n.strip() for n in args.classes.split(",")] if args.classes else None
    merge = read_merge_map(args.merge_map) if args.merge_map else None
    return coco, ClassMap.build(coco.categories, names, merge, source=str(args.annotations))


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.stats import write_overlays, write_statistics

    coco, class_map = _class_map(args)
    cache = MaskCache(coco, class_map, args.cache_dir or args.data_root / ".mask_cache", crowd=args.crowd)
    index = cache.build(workers=args.workers)
    out = args.out or cache.dir / "stats"
    stats = write_statistics(cache, out)
    overlays = write_overlays(cache, args.data_root, out, count=args.overlays)
    print(f"masks: {len(index)} images in {cache.dir}")
    if coco.issues:
        print(f"annotation problems: {dict(coco.issues)} (details above)")
    print(stats.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"statistics: {out / 'class_stats.csv'}, {out / 'class_stats.png'}, {len(overlays)} overlays")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    from .data.splits import read_exclude
    from .folds import build_folds, fold_summary, read_groups, stratification_error, write_folds

    check_writable(args.out, args.overwrite)  # fail before the work, not after
    coco, class_map = _class_map(args)
    groups = read_groups(args.groups) if args.groups else None
    files = [info.file_name for info in coco.images.values()]
    exclude = read_exclude(args.exclude, files) if args.exclude else None
    table = build_folds(coco, class_map, args.k, args.seed, args.group_by_folder, groups, exclude)
    if exclude:
        print(f"left out {len(exclude)} images listed in {args.exclude}")
    write_folds(table, args.out, overwrite=args.overwrite)
    names = list(class_map.names[1:])
    print(fold_summary(table).to_string())
    error = stratification_error(table[names].to_numpy(), table["fold"].to_numpy())
    print(f"max per-class deviation of fold frequency from overall: {error.max():.4f}")
    print(f"folds: {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    results = train(cfg, args.fold, resume=args.resume, overwrite=args.overwrite)
    for r in results if os.environ.get("RANK", "0") == "0" else []:
        print(f"fold {r.fold}: best mIoU {r.best_miou:.4f} at epoch {r.best_epoch} -> {r.run_dir}")
    return 0


def _floats(text: str | None) -> list[float] | None:
    return [float(x) for x in text.split(",")] if text else None


def cmd_predict(args: argparse.Namespace) -> int:
    from .infer import InferenceOptions, parse_tta, predict

    opts = InferenceOptions(
        views=parse_tta(args.tta),
        scales=_floats(args.scales) or [1.0],
        tile=args.tile,
        overlap=args.overlap,
        amp=args.amp,
        channels_last=args.channels_last,
    )
    summary = predict(
        args.runs,
        args.data_root,
        args.test,
        args.out,
        weights=_floats(args.weights),
        opts=opts,
        fmt=args.format,
        size=args.size or None,
        save_probs=args.save_probs,
        probs_size=args.probs_size or None,
        overlays=args.overlays,
        batch_size=args.batch_size,
        workers=args.workers,
        device=_device(args.device),
        overwrite=args.overwrite,
        postprocess=args.postprocess,
    )
    print(
        f"{summary['images']} images x {summary['models']} models x {summary['views']} views in "
        f"{summary['seconds']:.1f}s -> {summary['submission']} (validated)"
    )
    if summary["probs"]:
        print(f"probabilities: {summary['probs']}")
    return 0


def _device(name: str) -> str:
    from .runtime import resolve_device

    return str(resolve_device(name))


def _test_ids(test: Path) -> list[str]:
    """File names of a test COCO json in its order (the submission's expected ``image_id`` column)."""
    return [info.file_name for info in load_coco(test, None).images.values()]


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .data.coco import load_coco
    from .ensemble import load_weights, read_prob_files
    from .postprocess import PostProcess
    from .submission import submission_rows, write_submission
    from .voting import vote_mask

    coco = load_coco(args.test, None)
    size = args.size or None
    names, members = read_prob_files(args.probs, [str(i) for i in coco.images])
    weights = (
        load_weights(args.weights_file, len(args.probs), names)
        if args.weights_file
        else _floats(args.weights)
    )
    post = PostProcess.load(args.postprocess, names) if args.postprocess else None
    rows = []
    for (_, probs), info in zip(members, coco.images.values()):
        mask = vote_mask(probs, weights, args.vote, size)
        rows += submission_rows(info.file_name, post(mask) if post else mask, args.format, size)
    expected = [info.file_name for info in coco.images.values()]
    path = write_submission(rows, args.out, expected, len(names), args.format, size, args.overwrite)
    print(f"{args.vote} vote of {len(args.probs)} probability files -> {path} (validated)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .submission import validate_submission

    problems = validate_submission(
        args.submission, _test_ids(args.test), args.classes, args.format, args.size or None
    )
    if problems:
        print(f"{args.submission}: INVALID, {len(problems)} problem(s) (first shown):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{args.submission}: valid ({args.format}, {args.classes} classes)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .ensemble import evaluate_oof, save_weights, search_weights
    from .oof import OofRuns

    weights = _floats(args.weights)
    table = lambda frame: frame.to_string(index=False, float_format=lambda v: f"{v:.4f}")  # noqa: E731
    if args.search_weights:
        found = search_weights(args.runs, args.step, per_class=args.per_class)
        weights = found.weights
        print(table(found.table.head(10)))
        kind = "per-class weights" if args.per_class else f"weights {[round(float(w), 3) for w in weights]}"
        print(
            f"best {kind}: OOF mIoU {found.in_sample:.4f} in-sample (on the images they were chosen on: "
            f"optimistic); {found.nested:.4f} nested (each fold scored with weights chosen on the other "
            "folds): expect the latter"
        )
        if args.save_weights:
            save_weights(args.save_weights, found, args.runs, OofRuns(args.runs).class_names, args.overwrite)
            print(f"weights: {args.save_weights}")
    print(table(evaluate_oof(args.runs, weights)))
    if args.tune_postprocess:
        from .postprocess import tune

        tuned = tune(args.runs, weights)
        tuned.postprocess.save(args.tune_postprocess, args.overwrite)
        pp = tuned.postprocess
        print(
            f"post-processing (min_area as a fraction of the image): min_area {pp.min_area}, fill_holes "
            f"{sorted(pp.fill_holes)}"
        )
        print(
            f"OOF mIoU: plain {tuned.baseline:.4f}, post-processed {tuned.in_sample:.4f} in-sample, "
            f"{tuned.nested:.4f} nested -> {args.tune_postprocess}"
        )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import run_audit

    table, gallery = run_audit(args.runs, args.out, _floats(args.weights), args.gallery, args.overwrite)
    shown = table.head(10)[["rank", "file_name", "fold", "score", "pixel_error", "top_confusion"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"{len(table)} images ranked -> {Path(args.out) / 'audit.csv'}; {len(gallery)} panels in "
        f"{Path(args.out) / 'gallery'}. Put the file names of wrong labels in an exclude list "
        "(folds --exclude FILE, or data.exclude=FILE) and retrain."
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        args.out, images=args.images, epochs=args.epochs, overrides=args.overrides, overwrite=args.overwrite
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="competition",
        description="Kaggle-style COCO segmentation pipeline on smp_unet3p: prepare -> folds -> train -> "
        "predict -> ensemble -> submit.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>")

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
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("folds", help="multilabel-stratified (grouped) k-fold -> folds CSV")
    _add_dataset_args(p)
    p.add_argument("--out", type=Path, required=True, help="folds CSV to write")
    p.add_argument("--k", type=int, default=5, help="number of folds")
    p.add_argument("--seed", type=int, default=42)
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
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser(
        "train",
        help="train fold(s) from a YAML config -> runs/<name>/fold<k>/",
        description="Train one fold or all folds. Overrides are dotted keys, e.g. train.epochs=3 "
        "model.encoder_name=efficientnet-b0 model.params.cgm=false. Multi-GPU: "
        "torchrun --nproc_per_node N -m competition.cli train ...",
    )
    p.add_argument("--config", required=True, help="YAML file, or a shipped config's name (e.g. tiny_cpu)")
    p.add_argument("--fold", default="all", help="fold number, comma-separated numbers, or 'all'")
    p.add_argument("--resume", action="store_true", help="continue from each fold's last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing run directory")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "predict",
        help="ensemble fold checkpoints (+TTA, sliding window) on test images -> validated submission CSV",
    )
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="run dirs (every fold) or fold dirs")
    p.add_argument("--weights", default=None, help="comma-separated weight per run (default: equal)")
    p.add_argument("--data-root", required=True, type=Path, help="folder the test file names are relative to")
    p.add_argument(
        "--test", required=True, type=Path, help="test COCO json (images only), e.g. DATA/test.json"
    )
    p.add_argument("--out", required=True, type=Path, help="submission CSV to write")
    p.add_argument(
        "--tta", default="hflip", help="views: hflip,vflip,rot90,rot180 or 'none' (default: hflip)"
    )
    p.add_argument("--scales", default="1.0", help="comma-separated TTA scales, e.g. 0.75,1.0,1.25")
    p.add_argument(
        "--tile", type=int, default=None, help="sliding-window tile for larger images (default: off)"
    )
    p.add_argument("--overlap", type=int, default=128, help="sliding-window overlap in pixels")
    _add_submission_args(p)
    p.add_argument("--save-probs", type=Path, default=None, help="also save float16 probabilities (.npz)")
    p.add_argument("--probs-size", type=int, default=256, help="side of the saved probabilities (0: native)")
    p.add_argument("--overlays", type=int, default=4, help="overlay PNGs of the first N predictions")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding the next batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--postprocess", type=Path, default=None, help="postprocess.json of evaluate --tune-postprocess"
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_predict)

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
        "--weights-file", type=Path, default=None, help="weights.json of evaluate --save-weights (per-class)"
    )
    p.add_argument(
        "--vote", choices=("soft", "hard"), default="soft",
        help="soft: weighted mean of probabilities; hard: majority of the files' argmaxes (ties: larger "
        "summed probability)",
    )  # fmt: skip
    p.add_argument("--test", required=True, type=Path, help="test COCO json (row order and ids)")
    p.add_argument("--out", required=True, type=Path)
    _add_submission_args(p)
    p.add_argument(
        "--postprocess", type=Path, default=None, help="postprocess.json of evaluate --tune-postprocess"
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser(
        "validate", help="check a submission CSV against the test set; exit 1 listing problems"
    )
    p.add_argument("submission", type=Path)
    p.add_argument("--test", required=True, type=Path, help="test COCO json (expected ids and order)")
    p.add_argument(
        "--classes", type=int, default=len(BOOSTCAMP_CLASSES), help="number of classes (default 11)"
    )
    _add_submission_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "evaluate",
        help="out-of-fold mIoU per fold, per run and of soft/hard votes; weight search and post-processing "
        "tuning with nested scores",
    )
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="run dirs trained on the same folds")
    p.add_argument("--weights", default=None, help="comma-separated weight per run")
    p.add_argument("--search-weights", action="store_true", help="grid-search run weights on OOF mIoU")
    p.add_argument(
        "--per-class", action="store_true", help="with --search-weights: one weight per run and class"
    )
    p.add_argument("--step", type=float, default=0.1, help="grid step of the weight search")
    p.add_argument(
        "--save-weights", type=Path, default=None, help="write the searched weights (weights.json)"
    )
    p.add_argument(
        "--tune-postprocess", type=Path, default=None, metavar="FILE",
        help="tune per-class min-area / hole filling on OOF and write them to FILE (postprocess.json)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing weights / postprocess files")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "audit", help="rank training images by OOF disagreement with their labels -> audit.csv + gallery"
    )
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="run dirs trained on the same folds")
    p.add_argument("--weights", default=None, help="comma-separated weight per run")
    p.add_argument("--out", required=True, type=Path, help="output folder (audit.csv, gallery/)")
    p.add_argument("--gallery", type=int, default=24, help="panels of the N most suspicious images")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_audit)

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
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of configs/tiny_cpu.yaml")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_submission_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("boostcamp", "rle"), default="boostcamp", help="submission format")
    p.add_argument("--size", type=int, default=256, help="mask side in the CSV (0: native size)")


OOM_HINTS = {
    "train": "lower train.batch_size (keep the effective batch with train.accum_steps), set train.amp=bf16, "
    "train a smaller augment.size crop, or a lighter model (model.params.decoder_cat_channels=32)",
    "predict": "lower --batch-size, use fewer TTA views/scales, --amp bf16, or --tile 512 (sliding window) "
    "for large images",
}


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as short ``warning: ...`` lines, one per line of the message (no source path, no code)."""
    for text in str(message).splitlines():
        if text.strip():
            print(f"warning: {text.strip()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except torch.OutOfMemoryError as exc:
        print(
            f"competition {args.command}: error: out of memory: {str(exc).splitlines()[0]}", file=sys.stderr
        )
        print(f"hint: {OOM_HINTS.get(args.command, OOM_HINTS['train'])}", file=sys.stderr)
        return 1
    except (
        CocoFormatError,
        OutputExistsError,
        FileNotFoundError,
        ValueError,
        CheckpointError,
        NonFiniteLossError,
        OSError,
    ) as exc:
        print(f"competition {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
