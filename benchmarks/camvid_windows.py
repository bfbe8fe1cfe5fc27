"""CamVid: how many final epochs to average, on one finished checkpoint-averaged run of `camvid.py`.

A run trained with ``train.swa_epochs=K`` keeps the end-of-epoch weights of its last K epochs in
``last.ckpt``. Averaging changes only what is validated, not the training, so the average of its last N <= K
epochs is exactly the model a run with ``train.swa_epochs=N`` would have ended with. This scores every window
N in ``--windows`` at native 480x360 on the val split (``camvid.py``'s frames and confusion counts; N=1 is
the last epoch, no averaging), plain, and the windows ``--tta-windows`` also with TTA (hflip + scales
0.75/1/1.25, the ``predict --tta hflip --scales 0.75,1,1.25`` of the recipe). Fix the window before looking
(``camvid_lite0_native`` averages 4): the other rows show how much the choice matters, not one to pick.

python benchmarks/camvid_windows.py --out /work/camvid_native --run u3p_swa_s1 --windows 1,2,3,4,5,6 \
    --tta-windows 4,6
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from camvid import native_scores, save_rows

from competition.core import checkpoint as ckpt
from competition.core.checkpoint import read_run_config
from competition.inference.predictor import Ensemble, InferenceOptions, ModelSpec, load_specs
from competition.train.averaging import CheckpointAverage

TTA = InferenceOptions(views=["identity", "hflip"], scales=[0.75, 1.0, 1.25])


def window_models(fold_dir: Path, windows: list[int]) -> tuple[dict[int, ModelSpec], list[str], object]:
    """Per window N, the model spec of the average of the run's last N kept epochs; the class names and
    the fold's config."""
    cfg = read_run_config(fold_dir)
    specs, names = load_specs([fold_dir.parent], allow_partial=True)
    kept = ckpt.load_last(fold_dir / ckpt.LAST)["swa"]["kept"]
    too_wide = [n for n in windows if n > len(kept)]
    if too_wide:
        raise SystemExit(f"{fold_dir}: last.ckpt keeps {len(kept)} epochs; windows {too_wide} are wider")
    models = {}
    for n in windows:
        average = CheckpointAverage(copy.deepcopy(specs[0].model), n)
        average.load_state_dict({"kept": kept[-n:]})
        last = kept[-1]["epoch"]  # a run ending there averages exactly its last n kept epochs
        model = average.module(last, last + 1).eval()
        models[n] = replace(specs[0], model=model)
    return models, names, cfg


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="camvid.py's work folder")
    parser.add_argument("--run", required=True, help="a finished *_swa run under OUT/runs, e.g. u3p_swa_s1")
    parser.add_argument("--windows", default="1,2,3,4,5,6", help="comma-separated numbers of final epochs")
    parser.add_argument("--tta-windows", default="4", help="comma-separated windows also scored with TTA")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    windows = [int(n) for n in args.windows.split(",")]
    tta = [int(n) for n in args.tta_windows.split(",") if n]
    if set(tta) - set(windows):
        raise SystemExit(f"--tta-windows {args.tta_windows}: each must be one of --windows {args.windows}")
    models, names, cfg = window_models(args.out / "runs" / args.run / "fold0", windows)
    started = time.perf_counter()
    scores = native_scores([Ensemble([m]) for m in models.values()], cfg, args.out / "folds.csv", names)
    rows = [{"run": args.run, "window": n, "tta": "none"} | s for n, s in zip(models, scores)]
    if tta:
        scores = native_scores([Ensemble([models[n]], TTA) for n in tta], cfg, args.out / "folds.csv", names)
        rows += [{"run": args.run, "window": n, "tta": "hflip_scales"} | s for n, s in zip(tta, scores)]
    save_rows(args.out / "windows.csv", rows, key=("run", "window", "tta"))
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} torch {torch.__version__}, "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
