"""UNet 3+ against smp Unet and UnetPlusPlus under one controlled setup, plus UNet 3+ ablations and fixes.

Every variant trains with the same data, augmentation, optimizer, schedule, loss (Dice + CE), batch and
epochs, on the offline ImageNet EfficientNet-Lite0 encoder (``tu-efficientnet_lite0``); only the named
change differs.

- synthetic (multi-class, 11 classes): 48 training images, 24 held-out labelled images, 128 px, one seed per
  data draw. The held-out images are the validation set, used for the learning curves only: the score is the
  **last** epoch's held-out mIoU, so nothing is selected or tuned on them.
- isbi (binary): ISBI-2012 5-fold CV (24 / 6 images), 128 px training crops, full 512 px validation; the score
  is the pooled out-of-fold mIoU and pixel error of the last epoch's model of every fold.
- equal wall-clock: ``<model>@<reference>`` trains ``<model>`` for as many epochs as fit in the time the
  reference variant took on the same seed (from the measured epoch times of both).

Results: ``OUT/results.csv`` (one row per variant and seed), ``OUT/curves_<dataset>.png`` (score vs epoch and
vs seconds), and the summary table printed (mean ± std over seeds/folds, paired difference to UnetPlusPlus).

python benchmarks/study.py --dataset synthetic --seeds 0,1,2 --epochs 12
python benchmarks/study.py --dataset isbi --epochs 10 --variants unetplusplus,u3p_ds,u3p_ds_fullres
python benchmarks/study.py --dataset isbi --epochs 60 --crop 512 --amp bf16 --device cuda --workers 8  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from leaderboard_inference import ISBI, lite0

from competition.core.config_file import config_from_dict
from competition.core.metrics import confusion, iou_of
from competition.data.coco import load_coco
from competition.data.synthetic import make_synthetic_dataset
from competition.predictions.oof import OofRuns
from competition.train.loop import train

# name -> (arch, overrides); "u3p" is Unet3Plus with the library's defaults (no DS, no CGM)
DS = ["model.params.deep_supervision=true"]
LR10 = ["optimizer.decoder_lr_scale=10"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "unet": ("unet", []),
    "unetplusplus": ("unetplusplus", []),
    "u3p": ("unet3plus", []),
    "u3p_paper_order": ("unet3plus", ["model.params.decoder_upsample_after_conv=false"]),
    "u3p_cat32": ("unet3plus", ["model.params.decoder_cat_channels=32"]),
    "u3p_ds": ("unet3plus", DS),
    "u3p_ds_side0.25": ("unet3plus", DS + ["loss.side_weight=0.25"]),
    "u3p_ds_cgm_soft": ("unet3plus", DS + ["model.params.cgm=true", "model.params.cgm_gate=soft"]),
    "u3p_ds_cgm_hard": ("unet3plus", DS + ["model.params.cgm=true", "model.params.cgm_gate=hard"]),
    "u3p_lr10": ("unet3plus", LR10),
    "u3p_ds_lr10": ("unet3plus", DS + LR10),
    "u3p_fullres": ("unet3plus", ["model.params.decoder_full_res_channels=16"]),
    "u3p_ds_fullres": ("unet3plus", DS + ["model.params.decoder_full_res_channels=16"]),
    "u3p_fullres_lr10": ("unet3plus", ["model.params.decoder_full_res_channels=16", *LR10]),
    "unetplusplus_lr10": ("unetplusplus", LR10),
}


def base_config(data: dict, epochs: int, seed: int, args: argparse.Namespace) -> dict:
    return {
        "data": data,
        "model": {"arch": "unet", "encoder_name": "tu-efficientnet_lite0", "encoder_weights": lite0()},
        "loss": {"name": "dice_ce", "side_weight": 1.0},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"warmup_epochs": 1},
        "augment": {"hflip": 0.5, "vflip": 0.5, "rotate90": 0.5} | ({"size": args.crop} if args.crop else {}),
        "train": {
            "epochs": epochs,
            "batch_size": 4,
            "val_batch_size": 2,
            "workers": args.workers,
            "seed": seed,
            "progress": False,
            "checkpoint_every": epochs,
            "amp": args.amp,
            "device": args.device,
        },
    }


def synthetic_data(root: Path, seed: int) -> tuple[dict, list[int]]:
    """48 training images (fold 1) and 24 held-out ones (fold 0, the validation set of "fold 0")."""
    paths = make_synthetic_dataset(root, n_train=72, n_test=0, size=128, seed=200 + seed)
    coco = load_coco(paths["train"], root)
    ids = sorted(coco.images)
    table = pd.DataFrame(
        {
            "image_id": ids,
            "file_name": [coco.images[i].file_name for i in ids],
            "fold": [0 if i >= 48 else 1 for i in ids],
        }
    )
    table.to_csv(root / "folds.csv", index=False)
    data = {"root": str(root), "annotations": str(paths["train"]), "folds": str(root / "folds.csv")}
    return data, [0]


def isbi_data(root: Path, seed: int) -> tuple[dict, list[int]]:
    stems = sorted((p.stem for p in (ISBI / "image").glob("*.png")), key=int)
    root.mkdir(parents=True, exist_ok=True)
    folds = root / "folds.csv"
    pd.DataFrame({"image_id": stems, "fold": [i % 5 for i in range(len(stems))]}).to_csv(folds, index=False)
    data = {
        "format": "folder",
        "image_dir": str(ISBI / "image"),
        "mask_dir": str(ISBI / "label"),
        "classes": ["membrane", "cell"],
        "folds": str(folds),
    }
    return data, [0, 1, 2, 3, 4]


def train_variant(name: str, data: dict, folds: list[int], epochs: int, seed: int, out: Path, args) -> dict:
    arch, overrides = VARIANTS[name.split("@")[0]]
    raw = base_config(data, epochs, seed, args) | {"name": name.replace("@", "_at_"), "output_dir": str(out)}
    raw["model"]["arch"] = arch
    cfg = config_from_dict(raw, overrides)
    train(cfg, ",".join(map(str, folds)), resume=True)  # re-running the script never retrains a finished fold
    curves = [pd.read_csv(cfg.run_dir(f) / "metrics.csv").assign(fold=f) for f in folds]
    return {"run": cfg.output_dir / cfg.name, "curves": pd.concat(curves), "epochs": epochs}


def last_epoch_scores(run: dict, classes: int) -> dict:
    """The final epoch's validation mIoU (mean over folds) and, for CV, the pooled OOF mIoU / pixel error."""
    curves = run["curves"]
    last = curves[curves["epoch"] == curves["epoch"].max()]
    seconds = curves.groupby("fold")["seconds"].sum().mean()
    row = {
        "last_miou": float(last["miou"].mean()),
        "seconds_per_fold": float(seconds),
        "epochs": run["epochs"],
    }
    row["fold_miou"] = json.dumps([round(v, 4) for v in last["miou"]])
    if curves["fold"].nunique() > 1:  # pooled OOF of the folds' best weights (the pipeline's OOF files)
        oof = OofRuns([run["run"]])
        matrix = sum(
            confusion(probs[0].argmax(0), target, classes, oof.ignore_index) for _, _, probs, target in oof
        )
        row |= {
            "oof_miou": float(np.nanmean(iou_of(matrix))),
            "oof_pixel_error": 1 - np.trace(matrix) / matrix.sum(),
        }
    return row


def plot_curves(frame: pd.DataFrame, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, runs in curves.items():
        stacked = pd.concat([c.assign(seed=s) for s, c in runs.items()])
        stacked["clock"] = stacked.groupby(["seed", "fold"])["seconds"].cumsum()
        mean = stacked.groupby("epoch").agg(miou=("miou", "mean"), clock=("clock", "mean")).reset_index()
        line = by_epoch.plot(mean["epoch"], mean["miou"], marker=".", label=name)[0]
        by_time.plot(mean["clock"], mean["miou"], marker=".", color=line.get_color(), label=name)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training + validation seconds (per fold, this CPU)")
    for ax in (by_epoch, by_time):
        ax.set_ylabel("validation mIoU (mean over seeds / folds)")
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(frame: pd.DataFrame, score: str) -> pd.DataFrame:
    """Mean ± std over seeds (synthetic) or folds (ISBI, one row per fold) and the paired difference to
    UnetPlusPlus."""
    base = frame[frame["variant"] == "unetplusplus"].set_index("unit")[score]
    frame = frame.assign(delta=frame[score] - frame["unit"].map(base))
    return (
        frame.groupby("variant", sort=False)
        .agg(
            n=("unit", "nunique"),
            mean=(score, "mean"),
            std=(score, "std"),
            delta_vs_unetplusplus=("delta", "mean"),
            delta_std=("delta", "std"),
            seconds_per_fold=("seconds_per_fold", "mean"),
            epochs=("epochs", "mean"),
        )
        .reset_index()
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=("synthetic", "isbi"), default="synthetic")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--crop", type=int, default=None, help="training crop (ISBI default 128)")
    parser.add_argument(
        "--variants",
        default="unet,unetplusplus,u3p,u3p_paper_order,u3p_cat32,u3p_ds,"
        "u3p_ds_side0.25,u3p_ds_cgm_soft,u3p_ds_cgm_hard,u3p_lr10,u3p_fullres,"
        "unet@u3p,unetplusplus@u3p",
    )
    parser.add_argument("--amp", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # training keeps it (runtime.cpu_threads)
    if args.dataset == "isbi" and args.crop is None:
        args.crop = 128
    out = args.out or Path(f"runs/study_{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    classes = 11 if args.dataset == "synthetic" else 2
    seeds = [int(s) for s in args.seeds.split(",")] if args.dataset == "synthetic" else [0]
    rows, curves = [], {}
    for seed in seeds:
        root = out / f"seed{seed}"
        data, folds = (synthetic_data if args.dataset == "synthetic" else isbi_data)(root / "data", seed)
        done: dict[str, dict] = {}
        for name in args.variants.split(","):
            epochs = args.epochs
            if "@" in name:  # equal wall-clock with the reference variant of this seed
                model, reference = name.split("@")
                for needed in (model, reference):
                    if needed not in done:
                        done[needed] = train_variant(
                            needed, data, folds, args.epochs, seed, root / "runs", args
                        )
                per_epoch = {k: done[k]["curves"]["seconds"].mean() for k in (model, reference)}
                epochs = max(1, round(args.epochs * per_epoch[reference] / per_epoch[model]))
            started = time.perf_counter()
            done[name] = train_variant(name, data, folds, epochs, seed, root / "runs", args)
            scores = last_epoch_scores(done[name], classes)
            curves.setdefault(name, {})[seed] = done[name]["curves"]
            if args.dataset == "isbi":  # one unit per fold: paired differences over folds
                per_fold = json.loads(scores["fold_miou"])
                rows += [
                    {"variant": name, "unit": f, **scores, "last_miou": v} for f, v in zip(folds, per_fold)
                ]
            else:
                rows.append({"variant": name, "unit": seed, **scores})
            print(
                json.dumps(
                    {
                        "variant": name,
                        "seed": seed,
                        "wall_s": round(time.perf_counter() - started, 1),
                        **{k: v for k, v in scores.items() if k != "fold_miou"},
                    }
                ),
                flush=True,
            )
            frame = pd.DataFrame(rows)
            frame.to_csv(out / "results.csv", index=False)
            plot_curves(frame, curves, out / f"curves_{args.dataset}.png")
    table = summary(pd.DataFrame(rows), "last_miou")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    machine = platform.processor() or platform.machine()
    print(f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
