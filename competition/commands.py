"""What each ``competition`` command does with its parsed arguments: call one stage, print its summary.

The argument parser is in ``cli``; each ``cmd_<name>`` here returns the process exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .data.coco import ClassMap, MaskCache, load_coco, read_merge_map
from .io import check_writable


def _class_map(args: argparse.Namespace):
    coco = load_coco(args.annotations, args.data_root)
    names = [n.strip() for n in args.classes.split(",")] if args.classes else None
    merge = read_merge_map(args.merge_map) if args.merge_map else None
    if args.no_background and names is None:
        raise ValueError("--no-background needs --classes (the class names, none of them background)")
    return coco, ClassMap.build(coco.categories, names, merge, str(args.annotations), not args.no_background)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.images import check_images
    from .data.stats import write_overlays, write_statistics

    coco, class_map = _class_map(args)
    names = [info.file_name for info in coco.images.values()]
    # before anything is written: a wrong --data-root must not leave a folder with a mask cache in it
    check_images(args.data_root, names, str(args.annotations), "--data-root", allowed_missing=0.5)
    cache = MaskCache(coco, class_map, args.cache_dir or args.data_root / ".mask_cache", crowd=args.crowd)
    out = args.out or cache.dir / "stats"
    check_writable(out / "class_stats.csv", args.overwrite)
    index = cache.build(workers=args.workers)
    stats = write_statistics(cache, out)
    overlays = write_overlays(cache, args.data_root, out, count=args.overlays)
    print(f"masks: {len(index)} images in {cache.dir}")
    if coco.issues:
        print(f"annotation problems: {dict(coco.issues)} (details above)")
    print(stats.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"statistics: {out / 'class_stats.csv'}, {out / 'class_stats.png'}, {len(overlays)} overlays")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    from .data.splits import read_exclude
    from .folds import build_folds, fold_summary, read_groups, stratification_error, write_folds

    check_writable(args.out, args.overwrite)  # fail before the work, not after
    coco, class_map = _class_map(args)
    groups = read_groups(args.groups) if args.groups else None
    files = [info.file_name for info in coco.images.values()]
    exclude = read_exclude(args.exclude, files) if args.exclude else None
    table = build_folds(coco, class_map, args.k, args.seed, args.group_by_folder, groups, exclude)
    if exclude:
        print(f"left out {len(exclude)} images listed in {args.exclude}")
    write_folds(table, args.out, overwrite=args.overwrite)
    names = list(class_map.objects)
    print(fold_summary(table).to_string())
    error = stratification_error(table[names].to_numpy(), table["fold"].to_numpy())
    print(f"max per-class deviation of fold frequency from overall: {error.max():.4f}")
    print(f"folds: {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .data.splits import parse_folds
    from .preflight import preflight
    from .resume import finished_fold, run_config, started_folds
    from .train import train

    started = time.monotonic()  # train.time_limit counts from here, as the README says
    resume, overrides = args.resume, list(args.overrides)
    if args.init_from is not None:
        overrides.append(f"train.init_from={args.init_from.resolve()}")
    for flag, key in ((args.data_root, "data.root"), (args.annotations, "data.annotations")):
        if flag is not None:  # the flags every other stage takes, as their config keys
            overrides.append(f"{key}={flag.resolve()}")
    if isinstance(resume, str) and "=" in resume and not Path(resume).is_dir():
        resume, overrides = True, [resume, *overrides]  # `--resume key=value`: an override, not a folder
    if isinstance(resume, str):
        if args.config:
            raise ConfigError("give --config or a run folder to --resume, not both")
        cfg = run_config(resume, overrides)
    elif args.config:
        cfg = load_config(args.config, overrides)
    else:
        raise ConfigError("--config is required (or --resume runs/<name> to continue a run)")
    main = os.environ.get("RANK", "0") == "0"
    # a resumed run continues the folds it was started for, unless --fold says otherwise
    spec = args.fold or (",".join(map(str, started_folds(resume))) if isinstance(resume, str) else "all")
    folds = parse_folds(spec, cfg.data.folds)
    finished = bool(resume) and all(finished_fold(cfg, k) for k in folds)
    epoch_s = None if finished else preflight(cfg)  # seconds, before any run folder exists
    try:
        results = train(cfg, folds, bool(resume), args.overwrite, started, epoch_s)
    except KeyboardInterrupt:
        if main:
            print(interrupted_line(cfg, folds), file=sys.stderr)
        return 130
    for r in results if main else []:
        early = f" (train.patience: stopped after epoch {len(r.metrics)})" if r.stopped == "patience" else ""
        print(f"fold {r.fold}: best mIoU {r.best_miou:.4f} at epoch {r.best_epoch}{early} -> {r.run_dir}")
        if r.stopped == "time_limit":
            print(f"train.time_limit reached: continue with competition train --resume {r.run_dir.parent}")
    return 0


def interrupted_line(cfg: Any, folds: list[int]) -> str:
    """One line for an interrupted ``train``: the fold and epoch it stopped in, what ``last.ckpt`` holds,
    how to continue. The fold is the first of ``folds`` without its out-of-fold file."""
    import pandas as pd

    from .checkpoint import LAST, load_last
    from .oof import OOF_FILE

    fold = next((k for k in folds if not (cfg.run_dir(k) / OOF_FILE).is_file()), folds[-1])
    run_dir = cfg.run_dir(fold)
    metrics = run_dir / "metrics.csv"
    done = len(pd.read_csv(metrics)) if metrics.is_file() else 0
    saved = load_last(run_dir / LAST)["epoch"] if (run_dir / LAST).is_file() else 0
    kept = f"last.ckpt holds epoch {saved}" if saved else "no epoch checkpointed yet"
    return (
        f"interrupted in fold {fold}, epoch {done + 1} ({kept}): continue with "
        f"competition train --resume {run_dir.parent}"
    )


def _floats(text: str | None) -> list[float] | None:
    return [float(x) for x in text.split(",")] if text else None


def cmd_predict(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .infer import predict

    given = [args.data_root is not None, args.test is not None]
    if (args.images is not None and any(given)) or (args.images is None and not all(given)):
        raise ConfigError("give --images DIR, or --data-root and --test (not both)")
    runs, weights, postprocess = args.runs, _floats(args.weights), args.postprocess
    if (runs is None) == (args.bundle is None):
        raise ConfigError("give --runs or --bundle (one of them)")
    if args.bundle is not None:
        from .bundle import read_bundle

        bundle = read_bundle(args.bundle)
        runs, weights = bundle.runs, weights or bundle.weights
        postprocess = postprocess or bundle.postprocess
    summary = predict(
        runs,
        args.images or args.data_root,
        args.images or args.test,
        args.out,
        weights=weights,
        opts=_inference_options(args),
        fmt=args.format,
        size=args.size or None,
        save_probs=args.save_probs,
        probs_size=(args.size if args.probs_size is None else args.probs_size) or None,
        overlays=args.overlays,
        postprocess=postprocess,
        allow_partial=args.allow_partial,
        engine=args.engine,
        **_loading(args),
    )
    print(
        f"{summary['images']} images x {summary['models']} models x {summary['views']} views in "
        f"{summary['seconds']:.1f}s -> {summary['submission']} (validated)"
    )
    if summary["probs"]:
        print(f"probabilities: {summary['probs']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bundle import bundle_size, export_bundle
    from .runtime import stage_threads

    what = "the eager models and ONNX graphs" if args.onnx else "the runs' files"
    print(f"export: {len(args.runs)} run(s) to {args.out}, {what}, {stage_threads()} threads", flush=True)
    manifest = export_bundle(
        args.runs,
        args.out,
        _floats(args.weights),
        args.postprocess,
        args.onnx,
        args.overwrite,
        args.allow_partial,
    )
    folds = sum(name.endswith("best.safetensors") for name in manifest["files"])
    size, runs_size = bundle_size(args.out) / 2**20, sum(bundle_size(r) for r in args.runs) / 2**20
    print(
        f"bundle: {args.out} ({len(manifest['runs'])} runs, {folds} folds, {size:.1f} MB; the run folders "
        f"hold {runs_size:.1f} MB)"
    )
    if manifest["onnx"]:
        worst = max(manifest["onnx_max_difference"].values())
        print(f"ONNX: every fold checked against eager, max logit difference {worst:.1e} of the largest")
    return 0


def _inference_options(args: argparse.Namespace) -> Any:
    from .predictor import InferenceOptions, parse_tta

    return InferenceOptions(
        views=parse_tta(args.tta),
        scales=_floats(args.scales) or [1.0],
        tile=args.tile,
        overlap=args.overlap,
        amp=args.amp,
        channels_last=args.channels_last,
    )


def _loading(args: argparse.Namespace) -> dict[str, Any]:
    """The batch, worker, device and overwrite arguments of the inference commands."""
    return {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": _device(args.device),
        "overwrite": args.overwrite,
    }


def cmd_pseudo(args: argparse.Namespace) -> int:
    from .pseudo import coverage_summary, make_pseudo

    summary = make_pseudo(
        args.runs,
        args.data_root,
        args.test,
        args.out,
        threshold=args.threshold,
        weights=_floats(args.weights),
        opts=_inference_options(args),
        pooled=args.pooled,
        allow_partial=args.allow_partial,
        class_share=args.class_share,
        **_loading(args),
    )
    table = coverage_summary(summary["coverage"], summary["classes"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"{summary['images']} images pseudo-labelled -> {summary['dir']} (coverage.csv per image). "
        f"Train on them with data.extra=[{summary['dir']}]"
    )
    return 0


def _device(name: str) -> str:
    from .runtime import resolve_device

    return str(resolve_device(name))


def _test_images(test: Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """File names of a test COCO json in its order (the submission's expected ``image_id`` column) and each
    image's ``(height, width)``."""
    images = load_coco(test, None).images.values()
    return [i.file_name for i in images], {i.file_name: (i.height, i.width) for i in images}


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .ensemble import ensemble_probs

    path = ensemble_probs(
        args.probs,
        args.test,
        args.out,
        weights=_floats(args.weights),
        weights_file=args.weights_file,
        vote=args.vote,
        fmt=args.format,
        size=args.size or None,
        postprocess=args.postprocess,
        overwrite=args.overwrite,
        allow_partial=args.allow_partial,
    )
    print(f"{args.vote} vote of {len(args.probs)} probability files -> {path} (validated)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .submission import validate_submission

    ids, shapes = _test_images(args.test)
    background = None if args.no_background else 0
    problems = validate_submission(
        args.submission,
        ids,
        args.classes,
        args.format,
        args.size or None,
        shapes=shapes,
        background=background,
    )
    if problems:
        print(f"{args.submission}: INVALID, {len(problems)} problem(s) (first shown):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{args.submission}: valid ({args.format}, {args.classes} classes)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .ensemble import save_weights, search_weights
    from .oof import OofRuns
    from .postprocess import Tuner
    from .runtime import stage_threads
    from .scores import OofScorer

    weights, fold_weights = _floats(args.weights), None
    print(f"evaluate: {len(args.runs)} run(s), {stage_threads()} threads", flush=True)
    table = lambda frame: frame.to_string(index=False, float_format=lambda v: f"{v:.4f}")  # noqa: E731
    partial = args.allow_partial
    if args.search_weights:
        found = search_weights(
            args.runs, args.step, args.per_class, partial, args.sample_pixels or None, args.search
        )
        weights, fold_weights = found.weights, found.fold_weights
        print(table(found.table.head(10)))
        kind = "per-class weights" if args.per_class else f"weights {[round(float(w), 3) for w in weights]}"
        print(
            f"best {kind} ({found.method} search): OOF mIoU {found.in_sample:.4f} in-sample (on the "
            "images they were chosen on: "
            f"optimistic); {found.nested:.4f} nested (each fold scored with weights chosen on the other "
            "folds): expect the latter"
        )
        if args.save_weights:
            settings = {"step": args.step, "per_class": args.per_class, "search": found.method}
            save_weights(args.save_weights, found, OofRuns(args.runs, partial), args.overwrite, **settings)
            print(f"weights: {args.save_weights}")
    oof = OofRuns(args.runs, partial)
    scorer = OofScorer(oof, weights)
    tuner = Tuner(oof, weights, fold_weights) if args.tune_postprocess else None
    for item in oof:  # one pass: the OOF table and the post-processing candidates
        scorer.add(*item)
        if tuner is not None:
            tuner.add(*item)
    print(table(scorer.result().frame()))
    if tuner is not None:
        tuned = tuner.result()
        tuned.postprocess.save(args.tune_postprocess, args.overwrite)
        pp = tuned.postprocess
        print(
            f"post-processing (min_area as a fraction of the image): min_area {pp.min_area}, fill_holes "
            f"{sorted(pp.fill_holes)}"
        )
        print(
            f"OOF mIoU: plain {tuned.baseline:.4f}, post-processed {tuned.in_sample:.4f} in-sample, "
            f"{tuned.nested:.4f} nested -> {args.tune_postprocess}"
        )
    if args.tune_crf is not None:
        _tune_crf(oof, weights, args.tune_crf, args.overwrite, fold_weights)
    return 0


def _tune_crf(oof: Any, weights: Any, out: Path, overwrite: bool, fold_weights: Any = None) -> None:
    from dataclasses import asdict

    import numpy as np

    from . import provenance
    from .checkpoint import read_run_config
    from .crf import densecrf_module, tune_crf
    from .data.splits import data_files
    from .postprocess import PostProcess

    check_writable(out, overwrite)
    densecrf_module()  # a missing [crf] extra fails here, before a pass over the data
    # one fold's config stands for the data: tune_crf checks every image's file name against the OOF files
    files, root = data_files(read_run_config(oof.infos[0].fold_dirs()[0]))
    tuned = tune_crf(oof, files, root, weights, fold_weights=fold_weights)
    chosen = None if tuned.settings is None else asdict(tuned.settings)
    scores = {"oof_miou_plain": tuned.baseline, "oof_miou_in_sample": tuned.in_sample}
    scores["oof_miou_nested"] = tuned.nested
    w = None if weights is None else [float(v) for v in np.ravel(weights)]
    nested = fold_weights is not None
    block = provenance.record(
        "postprocess", oof.infos, oof.class_names, weights=w, nested_weights=nested, partial=oof.partial
    )
    PostProcess(oof.class_names, scores=scores, provenance=block, crf=chosen).save(out, overwrite)
    for row in tuned.table:
        print(f"  CRF {row['setting']}: OOF mIoU {row['oof_miou']:.4f}")
    if tuned.fold_scores:
        gains = np.array([nested - plain for plain, nested in tuned.fold_scores.values()])
        spread = f"mean {gains.mean():+.4f} ± {gains.std(ddof=1):.4f}"
        print(f"nested gain per fold: {np.round(gains, 4).tolist()} ({spread})")
    print(
        f"dense CRF: {chosen or 'none (none beat the plain arg-max)'}; OOF mIoU plain {tuned.baseline:.4f}, "
        f"with it {tuned.in_sample:.4f} in-sample, {tuned.nested:.4f} nested (NaN with one fold) -> {out}"
    )


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import run_audit

    table, gallery = run_audit(
        args.runs, args.out, _floats(args.weights), args.gallery, args.overwrite, args.allow_partial
    )
    shown = table.head(10)[["rank", "file_name", "fold", "score", "pixel_error", "top_confusion"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"{len(table)} images ranked -> {Path(args.out) / 'audit.csv'}; {len(gallery)} panels in "
        f"{Path(args.out) / 'gallery'}. Put the file names of wrong labels in an exclude list "
        "(folds --exclude FILE, or data.exclude=FILE) and retrain."
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    weights = _floats(args.weights)
    if args.weights_file:
        from .ensemble import weights_for_runs

        weights = weights_for_runs(args.weights_file, args.runs)
    path = build_report(
        args.runs, args.out, args.submission, args.format, args.size or None, args.worst, args.overwrite,
        weights=weights, allow_partial=args.allow_partial,
    )  # fmt: skip
    print(f"report: {path.resolve()} (self-contained; open it in a browser: file://{path.resolve()})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        args.out,
        images=args.images,
        epochs=args.epochs,
        overrides=args.overrides,
        overwrite=args.overwrite,
        pseudo=args.pseudo,
    )
    return 0
