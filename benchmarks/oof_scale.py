"""The OOF tools at competition size: fabricated but realistic OOF files written with the project's own
``OofWriter`` (any image count, run count, fold count, size and class count), then every tool timed in a
forked child with its CPU seconds and peak RSS.

Tools: ``read`` (one pass that only decompresses: the floor of every tool), ``evaluate``
(``scores.evaluate_oof``), ``search`` (``ensemble.search_weights``, sampled pixels, the default method:
greedy beyond 300 grid vectors), ``search_grid`` / ``search_greedy`` (one method forced),
``search_exhaustive`` (the search as it was before the pixel sample: every weight vector re-votes
every image, timed on ``--exhaustive-images`` images and extrapolated), ``search_per_class``, ``tune``
(``postprocess.tune``), ``audit`` (``audit.run_audit``: table and gallery) and ``report``
(``report.build_report``). ``--compare`` also runs the exact search
(every pixel, ``per_image=None``), to see whether the sampled search chose the same weights; it holds every
pixel of every run in memory, so use it at a few hundred images, not at 3272.

``--smooth SIGMA`` blurs each run's noise so that its errors come as blobs (at 4 px, about 27 components per
class per image in the vote) instead of the default one-pixel specks (about 520): post-processing tuning's
work grows with the components, so the default is its worst case. ``--make-workers`` fabricates in processes.

python benchmarks/oof_scale.py --images 3272 --runs 5 --folds 5 --size 256 --out /tmp/oof_scale
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import time
import traceback
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from competition.predictions.oof import OofWriter

CLASSES = ["Background", "General trash", "Paper", "Paper pack", "Metal", "Glass", "Plastic", "Styrofoam",
           "Plastic bag", "Battery", "Clothing"]  # fmt: skip


def fabricate(
    out: Path,
    images: int,
    runs: int,
    folds: int,
    size: int,
    classes: int,
    seed: int = 0,
    only: list[int] | None = None,
    dtype: str = "uint8",
    smooth: float = 0.0,
) -> list[Path]:
    """Run directories whose fold files hold ``config.yaml``, ``metrics.csv``, ``best.json`` and an
    ``oof.npz``: targets of a few rectangles per image, each run's probabilities a noisy softmax of them
    (run ``r`` drawn from its own seed, so ``only`` some runs can be made in another process).

    ``smooth``: the noise of each class blurred with a Gaussian of this sigma (pixels) and scaled back to its
    spread, so that errors come as blobs, as a model's do, instead of one-pixel specks (0: specks)."""
    from competition.core.config_file import config_from_dict

    names = CLASSES[:classes] if classes <= len(CLASSES) else [f"c{i}" for i in range(classes)]
    rng = np.random.default_rng(seed)
    targets = []
    for _ in range(images):
        t = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(1, 5)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(8, size // 2, 2)
            t[y : y + h, x : x + w] = rng.integers(1, classes)
        targets.append(t)
    fold_of = np.arange(images) % folds
    data = {"root": str(out), "annotations": str(out / "train.json"), "folds": str(out / "folds.csv")}
    dirs, (rows, cols) = [], np.indices((size, size))
    for r in range(runs) if only is None else only:
        rng = np.random.default_rng([seed, r])
        cfg = config_from_dict({"name": f"run{r}", "data": data, "train": {"epochs": 1}})
        noise = 1.0 + 0.3 * r
        for f in range(folds):
            d = out / f"run{r}" / f"fold{f}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.yaml").write_text(cfg.to_yaml())
            (d / "best.json").write_text(json.dumps({"fold": f, "classes": names}))
            _records(d)
            with OofWriter(d / "oof.npz", "probs", None, names, f, 255, dtype=dtype) as writer:
                for i in np.flatnonzero(fold_of == f):
                    logits = rng.normal(0, noise, (classes, size, size)).astype(np.float32)
                    if smooth:
                        logits = np.stack([cv2.GaussianBlur(c, (0, 0), smooth) for c in logits])
                        logits *= noise / logits.std(axis=(1, 2), keepdims=True)
                    logits[targets[i], rows, cols] += 2.5
                    probs = torch.from_numpy(logits).softmax(0)[None]
                    batch = {"image_id": [str(i)], "file_name": [f"{i}.jpg"]}
                    writer.add(batch | {"mask": torch.from_numpy(targets[i])[None]}, probs)
        dirs.append(out / f"run{r}")
    return dirs


def _fabricate_in(processes: int, root: Path, args: argparse.Namespace) -> list[Path]:
    """``fabricate`` every run, the runs shared among ``processes`` processes (each run draws from its own
    seed, so the files are the same whatever the count)."""
    shares = [list(range(args.runs))[i::processes] for i in range(max(1, processes))]
    common = (root, args.images, args.runs, args.folds, args.size, args.classes)
    with multiprocessing.get_context("fork").Pool(len(shares)) as pool:
        jobs = [(*common, 0, share, args.dtype, args.smooth) for share in shares if share]
        made = pool.starmap(fabricate, jobs)
    return sorted(p for paths in made for p in paths)


def _records(fold_dir: Path) -> None:
    """A one-epoch ``metrics.csv`` with the columns the report plots, and the best epoch in ``best.json``."""
    (fold_dir / "metrics.csv").write_text("epoch,train_loss,val_loss,miou,lr\n1,0.9,0.8,0.5,0.001\n")
    best = json.loads((fold_dir / "best.json").read_text())
    (fold_dir / "best.json").write_text(json.dumps(best | {"epoch": 1, "miou": 0.5}))


def _exhaustive(runs: list[Path], limit: int) -> int:
    """The weight search as it was: every grid vector re-votes every image (first ``limit`` images)."""
    from competition.oof.nested import FoldTable
    from competition.oof.weights import _simplex
    from competition.predictions.oof import OofRuns

    oof = OofRuns(runs)
    grid = _simplex(len(runs), 0.1)
    table = FoldTable(oof.num_classes, oof.ignore_index)
    for n, (_, fold, probs, target) in enumerate(oof):
        if n == limit:
            return n
        stack = np.stack([p.astype(np.float32) for p in probs])
        for i, w in enumerate(grid):
            table.add(fold, i, np.tensordot(w, stack, 1).argmax(0), target)
    return len(oof)


def _coco(root: Path, images: int, classes: int) -> None:
    """The ``train.json`` the fabricated runs' config names: images and categories, no annotations (the
    audit and the report read file names from it; the images themselves are absent, so panels show the
    label and the prediction only)."""
    if (root / "train.json").is_file():
        return
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 256, "height": 256} for i in range(images)],
        "categories": [{"id": c, "name": n} for c, n in enumerate(CLASSES[1:classes], start=1)],
        "annotations": [],
    }
    (root / "train.json").write_text(json.dumps(coco))


def _tool(name: str, runs: list[Path], args: argparse.Namespace) -> dict:
    from competition.oof.audit import run_audit
    from competition.oof.report import build_report
    from competition.oof.scores import evaluate_oof
    from competition.oof.tune import tune
    from competition.oof.weights import search_weights
    from competition.predictions.oof import OofRuns

    out = args.out / "outputs"
    if name == "read":  # the floor of any tool: one pass that only decompresses every map
        return {"images": sum(1 for _ in OofRuns(runs))}
    if name == "evaluate":
        return {"miou": float(evaluate_oof(runs)["miou"].iloc[-1])}
    if name in ("search", "search_grid", "search_greedy", "search_exact"):
        method = {"search_grid": "grid", "search_greedy": "greedy"}.get(name, "auto")
        found = search_weights(
            runs, per_image=None if name == "search_exact" else args.per_image, method=method
        )
        weights = np.round(found.weights, 3).tolist()
        return {"method": found.method, "weights": weights, "tried": len(found.table),
                "in": found.in_sample, "nested": found.nested}  # fmt: skip
    if name == "search_per_class":
        found = search_weights(runs, per_class=True, per_image=args.per_image)
        return {"method": found.method, "in": found.in_sample, "nested": found.nested}
    if name == "search_exhaustive":
        return {"images_timed": _exhaustive(runs, args.exhaustive_images)}
    if name == "tune":
        return {"nested": tune(runs).nested}
    if name == "audit":
        table, gallery = run_audit(runs, out / "audit", overwrite=True)
        return {"rows": len(table), "gallery": len(gallery)}
    if name == "report":
        return {"bytes": build_report(runs, out / "report.html", overwrite=True).stat().st_size}
    raise ValueError(name)


def _child(name: str, runs: list[Path], args: argparse.Namespace, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(args.threads)
    os.environ["OOF_WORKERS"] = str(args.workers)  # threads reading the OOF files ahead (io.read_ahead)
    start = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    try:
        result = _tool(name, runs, args)
    except Exception:  # the parent reports it and goes on with the next tool
        queue.put({"tool": name, "error": traceback.format_exc().strip().splitlines()[-1]})
        raise
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    queue.put({"tool": name, "cpu_s": cpu, "wall_s": time.perf_counter() - wall,
               "peak_rss_gb": end.ru_maxrss / 2**20, **result})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3272)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--per-image", type=int, default=2048, help="pixels sampled per image by the search")
    parser.add_argument("--exhaustive-images", type=int, default=20, help="images the old search is timed on")
    parser.add_argument(
        "--tools",
        default="read,evaluate,search,search_grid,search_exhaustive,search_per_class,tune,audit,report",
    )
    parser.add_argument("--compare", action="store_true", help="also the exact search (every pixel)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="threads reading OOF maps ahead (1: none)")
    parser.add_argument("--dtype", choices=("uint8", "float16"), default="uint8", help="OOF probabilities as")
    parser.add_argument("--out", type=Path, default=Path("/tmp/oof_scale"))
    parser.add_argument("--keep", action="store_true", help="reuse fabricated files of the same shape")
    parser.add_argument("--use-runs", type=int, default=None, help="time the tools on the first N runs only")
    parser.add_argument("--make-workers", type=int, default=1, help="processes fabricating the runs' files")
    parser.add_argument("--smooth", type=float, default=0.0, help="noise blur, px (0: specks)")
    args = parser.parse_args()

    shape = f"{args.images}x{args.runs}x{args.folds}x{args.size}x{args.classes}_{args.dtype}"
    shape += f"_smooth{args.smooth:g}" if args.smooth else ""
    root = args.out / shape
    started = time.perf_counter()
    if not (args.keep and root.is_dir()):
        shutil.rmtree(root, ignore_errors=True)
        runs = _fabricate_in(args.make_workers, root, args)
    else:
        runs = sorted(p for p in root.glob("run*") if p.is_dir())
        for fold_dir in root.glob("run*/fold*"):
            _records(fold_dir)  # files made before the report was timed had fewer fields
    _coco(root, args.images, args.classes)
    gb = sum(f.stat().st_size for f in root.rglob("oof.npz")) / 2**30
    print(f"OOF files: {shape}, {gb:.2f} GB ({time.perf_counter() - started:.0f} s to make)", flush=True)
    runs = runs[: args.use_runs or len(runs)]
    tools = args.tools.split(",") + (["search_exact"] if args.compare else [])
    rows = []
    ctx = multiprocessing.get_context("fork")
    for name in tools:
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(name, runs, args, queue))
        child.start()
        child.join()
        row = queue.get() if not queue.empty() else {"tool": name, "error": f"exit code {child.exitcode}"}
        if name == "search_exhaustive":  # extrapolated to every image
            row["cpu_s_all_images"] = row["cpu_s"] * args.images / max(1, row["images_timed"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    floor = table.set_index("tool").get("cpu_s", pd.Series(dtype=float)).get("read")
    if floor:  # every tool as a multiple of the floor: one pass that reads every map once
        wall = table.set_index("tool")["wall_s"]["read"]
        table.insert(3, "cpu_x_read", table["cpu_s"] / floor)
        table.insert(4, "wall_x_read", table["wall_s"] / wall)
    print(f"\n{platform.node()} {platform.processor() or platform.machine()}, torch threads {args.threads}, "
          f"{args.workers} read-ahead workers, OOF {args.dtype}")  # fmt: skip
    print(table.to_string(index=False))
    table.to_csv(args.out / f"oof_scale_{shape}.csv", index=False)


if __name__ == "__main__":
    main()
