"""Training-side leaderboard techniques (copy-paste, pseudo-label rounds), scored on held-out labelled data.

The held-out images play the competition's test set: pseudo-labelling sees them without labels (as it would
see the test images), and nothing is tuned on them; their labels only score the fold ensemble at the end.
Every method trains with the same config, epochs and seed as the baseline; only the named change differs.
Prediction is the fold ensemble with hflip TTA for every method (and for pseudo-labelling).

- synthetic: the trash generator with Battery and Clothing 10x rarer than the other classes (as in the
  Boostcamp data), 48 training images (3 folds) + 24 held-out, 128 px; UNet 3+ (resnet18, DS + soft CGM,
  cat 16), 10 epochs from scratch. Methods: baseline, copy-paste (p 0.5, class-balanced, scale 0.5-1.5),
  pseudo round 1 (threshold 0.9), pseudo round 2 (``--rounds 2``).
- isbi: ISBI-2012, 6 held-out images (chosen by the seed) + 24 in 4 folds, 512 px; smp Unet on the offline
  ImageNet EfficientNet-Lite0, 6 epochs of 128 px crops. Methods: baseline, pseudo round 1 (threshold 0.9).

python benchmarks/leaderboard_training.py --seeds 0,1,2 --out runs/leaderboard_training
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from leaderboard_inference import ISBI, isbi_split, lite0, train_settings

from competition.core.config_file import config_from_dict
from competition.core.metrics import confusion, iou_of
from competition.data.classes import BOOSTCAMP_CLASSES, ClassMap
from competition.data.coco import MaskCache, load_coco
from competition.data.datasets import CocoSegmentationDataset, MaskFolderDataset
from competition.data.folds import build_folds, write_folds
from competition.data.synthetic import make_synthetic_dataset
from competition.inference.predictor import Ensemble, InferenceOptions, load_specs
from competition.inference.pseudo import make_pseudo
from competition.train.loop import train

RARE = ("Battery", "Clothing")
TTA = InferenceOptions(views=["identity", "hflip"])
THRESHOLD = 0.9
U3P = {"deep_supervision": True, "cgm": True, "cgm_gate": "soft", "decoder_cat_channels": 16}


def synthetic(seed: int, root: Path) -> dict:
    """The base config, held-out (image, mask) pairs, class names and the unlabelled held-out json."""
    frequency = [0.1 if name in RARE else 1.0 for name in BOOSTCAMP_CLASSES[1:]]
    paths = make_synthetic_dataset(root, n_train=72, n_test=0, size=128, seed=100 + seed,
                                   class_frequency=frequency)  # fmt: skip
    coco_all = json.loads(paths["train"].read_text())

    def subset(ids: range, name: str, labelled: bool = True) -> Path:
        part = {**coco_all, "images": [i for i in coco_all["images"] if i["id"] in ids]}
        part["annotations"] = [a for a in coco_all["annotations"] if a["image_id"] in ids and labelled]
        (root / name).write_text(json.dumps(part))
        return root / name

    train_json, holdout_json = subset(range(48), "train48.json"), subset(range(48, 72), "holdout.json")
    coco = load_coco(train_json, root)
    class_map = ClassMap.build(coco.categories)
    write_folds(build_folds(coco, class_map, 3, seed=seed), root / "folds.csv", overwrite=True)
    cache = MaskCache(load_coco(holdout_json, root), class_map, root / ".mask_cache")
    cache.build(workers=1, progress=False)
    base = {
        "data": {"root": str(root), "annotations": str(train_json), "folds": str(root / "folds.csv")},
        "model": {"arch": "unet3plus", "encoder_name": "resnet18", "encoder_weights": None, "params": U3P},
        "loss": {"name": "dice_ce", "side_weight": 0.5},
        "optimizer": {"lr": 3e-3},
        "scheduler": {"warmup_epochs": 0.5, "min_lr_ratio": 0.05},
        "augment": {"hflip": 0.5, "rotate90": 0.5},
        "train": train_settings(10, seed=seed),
    }  # fmt: skip
    items = [(s["image"], s["mask"].numpy()) for s in CocoSegmentationDataset(cache, root)]
    return {
        "base": base,
        "items": items,
        "names": list(class_map.names),
        "root": root,
        "test": subset(range(48, 72), "holdout_unlabelled.json", labelled=False),
        "copy_paste": True,
    }


def isbi(seed: int, root: Path, data: Path = ISBI) -> dict:
    held, folds = isbi_split(seed, root, data)
    names = ["membrane", "cell"]
    test = root / "holdout_unlabelled.json"
    images = [
        {"id": k, "file_name": f"image/{s}.png", "height": 512, "width": 512} for k, s in enumerate(held)
    ]
    test.write_text(
        json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "cell"}]})
    )
    base = {
        "data": {"format": "folder", "image_dir": str(data / "image"), "mask_dir": str(data / "label"),
                 "classes": names, "folds": str(folds)},
        "model": {"arch": "unet", "encoder_name": "tu-efficientnet_lite0", "encoder_weights": lite0()},
        "loss": {"name": "dice_ce"},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"warmup_epochs": 1},
        "augment": {"size": 128, "hflip": 0.5, "vflip": 0.5, "rotate90": 0.5, "elastic": 0.3},
        "train": train_settings(6, seed=seed, val_batch_size=2),
    }  # fmt: skip
    dataset = MaskFolderDataset(data / "image", data / "label", None, "binary", held)
    items = [(s["image"], s["mask"].numpy()) for s in dataset]
    return {"base": base, "items": items, "names": names, "root": data, "test": test, "copy_paste": False}


def heldout_scores(run_dir: Path, items: list, names: list[str]) -> dict:
    """mIoU and per-class IoU of the run's fold ensemble (hflip TTA) on the held-out images."""
    specs, _ = load_specs([run_dir])
    ensemble = Ensemble(specs, TTA)
    total = sum(
        confusion(ensemble(image[None])[0].argmax(0).numpy(), target, len(names), 255)
        for image, target in items
    )
    iou = iou_of(total)
    return {"heldout_miou": float(np.nanmean(iou))} | {f"iou_{n}": float(v) for n, v in zip(names, iou)}


def pseudo_quality(folder: Path, items: list) -> dict:
    """Share of held-out pixels pseudo-labelled, and how many of those carry the true class."""
    manifest = json.loads((folder / "pseudo.json").read_text())
    kept = right = total = 0
    for item, (_, target) in zip(manifest["images"], items):
        mask = cv2.imread(str(folder / item["mask"]), cv2.IMREAD_UNCHANGED)
        confident = mask != 255
        kept, right, total = (
            kept + confident.sum(),
            right + (mask == target)[confident].sum(),
            total + mask.size,
        )
    return {"pseudo_coverage": kept / total, "pseudo_accuracy": right / max(kept, 1)}


def one_seed(dataset: str, seed: int, out: Path, rounds: int, threshold: float = THRESHOLD) -> list[dict]:
    root = out / f"{dataset}_seed{seed}"
    setup = (synthetic if dataset == "synthetic" else isbi)(seed, root / "data")
    rows: list[dict] = []

    def run(name: str, overrides: list[str]) -> Path:
        raw = {"name": name.replace(" ", "_"), "output_dir": str(root / "runs"), **setup["base"]}
        cfg = config_from_dict(raw, overrides)
        started = time.perf_counter()
        train(cfg, "all", resume=True)  # a re-run of the script re-evaluates finished folds, never retrains
        row = {
            "dataset": dataset,
            "seed": seed,
            "method": name,
            "train_seconds": time.perf_counter() - started,
        }
        rows.append(row | heldout_scores(cfg.output_dir / cfg.name, setup["items"], setup["names"]))
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}),
            flush=True,
        )
        return cfg.output_dir / cfg.name

    previous = run("baseline", [])
    if setup["copy_paste"]:
        run("copy-paste", ["augment.copy_paste=0.5"])
    tag = "" if threshold == THRESHOLD else f" t{threshold:g}"
    for r in range(1, rounds + 1):
        folder = root / f"pseudo_round{r}{tag.replace(' ', '_')}"
        if not (folder / "pseudo.json").is_file():
            make_pseudo([previous], setup["root"], setup["test"], folder, threshold, opts=TTA, workers=0,
                        progress=False)  # fmt: skip
        previous = run(f"pseudo round {r}{tag}", [f"data.extra=[{folder}]"])
        rows[-1] |= pseudo_quality(folder, setup["items"])
    return rows


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of held-out mIoU (and rare-class IoU), paired difference to the baseline."""
    base = frame[frame["method"] == "baseline"].set_index(["dataset", "seed"])["heldout_miou"]
    frame = frame.join(base.rename("base"), on=["dataset", "seed"])
    frame["delta"] = frame["heldout_miou"] - frame["base"]
    columns = {
        "seeds": ("seed", "nunique"),
        "heldout_mean": ("heldout_miou", "mean"),
        "heldout_std": ("heldout_miou", "std"),
        "delta_mean": ("delta", "mean"),
        "delta_std": ("delta", "std"),
    }
    for name in RARE:
        if f"iou_{name}" in frame:
            columns[f"{name}_iou"] = (f"iou_{name}", "mean")
    for name in ("pseudo_coverage", "pseudo_accuracy", "train_seconds"):
        if name in frame:
            columns[name] = (name, "mean")
    return frame.groupby(["dataset", "method"], sort=False).agg(**columns).reset_index()  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default="synthetic,isbi")
    parser.add_argument("--rounds", type=int, default=1, help="pseudo-label rounds")
    parser.add_argument(
        "--threshold", type=float, default=THRESHOLD, help="pseudo-label confidence threshold"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/leaderboard_training"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for dataset in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += one_seed(dataset, seed, args.out, args.rounds, args.threshold)
            pd.DataFrame(rows).to_csv(args.out / "results.csv", index=False)  # partial results as they come
            table = summary(pd.DataFrame(rows))
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
    machine = platform.processor() or platform.machine()
    print(f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
