"""``competition train``: train fold(s) from a YAML config -> runs/<name>/fold<k>/."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add(sub: Any) -> None:
    """The ``train`` subparser."""
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.stage import interrupted_line, plan_training, run_training

    plan = plan_training(
        args.config, args.resume, args.fold, args.overrides, args.overwrite, args.init_from, args.data_root,
        args.annotations,
    )  # fmt: skip
    main = os.environ.get("RANK", "0") == "0"
    try:
        results = run_training(plan)
    except KeyboardInterrupt:
        if main:
            print(interrupted_line(plan), file=sys.stderr)
        return 130
    for r in results if main else []:
        early = f" (train.patience: stopped after epoch {len(r.metrics)})" if r.stopped == "patience" else ""
        print(f"fold {r.fold}: best mIoU {r.best_miou:.4f} at epoch {r.best_epoch}{early} -> {r.run_dir}")
        if r.stopped == "time_limit":
            print(f"train.time_limit reached: continue with competition train --resume {r.run_dir.parent}")
    return 0
