"""``competition sweep``:
a hyper-parameter search on Optuna (each trial an ordinary run), or the best trial's config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add(sub: Any) -> None:
    """The ``sweep`` subparser."""
    p = sub.add_parser(
        "sweep",
        help="search a config's hyper-parameters on Optuna: trials are runs, pruned by epoch, many workers "
        "on one study",
        description="Train --trials runs of --config with overrides sampled from --space (YAML over dotted "
        "keys), each runs/<study>/trial_<n>; after each epoch the trial reports its validation mIoU and "
        "the pruner may stop it there. Start the same command on more processes or machines (one "
        "--storage) to share the study. With --best STUDY, write the best trial's config instead.",
    )
    p.add_argument("--config", help="the base YAML config (or a shipped config's name)")
    p.add_argument("--space", type=Path, help="search space YAML: key: [values] or {low, high, log, int}")
    p.add_argument("--study", help="the study's name (its runs go to OUTPUT_DIR/<study>/)")
    p.add_argument("--trials", type=int, default=20, help="trials of the study in all (every worker's)")
    p.add_argument("--timeout", default=None, help="stop starting trials after this long (8h, 90m, 3600)")
    p.add_argument(
        "--storage", default=None,
        help="sqlite:///FILE, postgresql://USER:PASS@HOST/DB (any SQLAlchemy URL) or journal:FILE "
        "(default: a SQLite file beside the runs)",
    )  # fmt: skip
    p.add_argument("--fold", default="0", help="folds each trial trains: a number, 0,2 or 'all'")
    p.add_argument(
        "--pruner", choices=("median", "hyperband", "none"), default="median",
        help="stops a trial at an epoch boundary: median (below the median of earlier trials at that epoch)",
    )  # fmt: skip
    p.add_argument("--best", metavar="STUDY", default=None, help="write STUDY's best config to --out")
    p.add_argument("--out", type=Path, default=None, help="with --best: the YAML to write")
    p.add_argument("--runs", default="runs", help="with --best and the default storage: the runs folder")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of the base config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.config import ConfigError, parse_duration
    from ..train.sweep import best_config, sweep
    from ..train.trials import state_counts

    if args.best:
        if args.out is None:
            raise ConfigError("--best needs --out best.yaml")
        path = best_config(args.best, args.out, args.storage, args.runs)
        print(f"best trial's config -> {path} (competition train --config {path})")
        return 0
    if not (args.config and args.space and args.study):
        raise ConfigError("give --config, --space and --study (or --best STUDY --out best.yaml)")
    timeout = parse_duration(args.timeout) if args.timeout else None
    study = sweep(args.config, args.space, args.study, args.trials, timeout, args.storage, args.fold,
                  args.pruner, overrides=args.overrides)  # fmt: skip
    counts = {state: n for state, n in state_counts(study).items() if n}
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = f"best trial {study.best_trial.number}: mIoU {study.best_value:.4f}" if done else "no trial done"
    print(f"study {args.study}: {len(study.trials)} trials {counts}; {best}")
    return 0
