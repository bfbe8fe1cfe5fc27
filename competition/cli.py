"""``competition``: the pipeline's command line, one subcommand per stage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    from .folds import build_folds, fold_summary, stratification_error, write_folds

    check_writable(args.out, args.overwrite)  # fail before the work, not after
    coco, class_map = _class_map(args)
    table = build_folds(coco, class_map, args.k, args.seed, group_by_folder=args.group_by_folder)
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
        "--group-by-folder", action="store_true", help="keep each image folder (e.g. batch_01_vt) in one fold"
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (
        CocoFormatError,
        OutputExistsError,
        FileNotFoundError,
        ValueError,
        CheckpointError,
        NonFiniteLossError,
    ) as exc:
        print(f"competition {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
