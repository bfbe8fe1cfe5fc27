"""Ensemble-weight search on out-of-fold predictions, and ``weights.json`` as written.

Each training image is out-of-fold in exactly one fold, so a run's OOF predictions (``fold*/oof.npz``)
cover the training set once: their mIoU is the CV score of the fold ensemble. Runs trained on the same folds
file can be combined image by image with weights. Everything streams one image at a time.

Weights chosen on the OOF predictions score optimistically on those same predictions. ``search_weights``
therefore reports two numbers: the in-sample score and a nested one, where each fold is scored with the
weights chosen on the other folds only.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..core.io import atomic_write_text
from ..predictions import provenance
from ..predictions.oof import OofRuns, opened
from ..predictions.voting import class_weights
from .nested import FoldTable, nested_folds
from .sample import OofSample, column_counts, sample_oof, vote_counts

PER_IMAGE = 2048  # labelled pixels sampled per image for the weight search (oof_sample)
SEARCHES = ("auto", "grid", "greedy")
GRID_LIMIT = 300  # "auto" scores the whole grid up to this many weight vectors (4 runs at step 0.1: 286)


@dataclass
class WeightSearch:
    """Result of ``search_weights``."""

    weights: np.ndarray  # best on every fold together: [runs], or [runs, classes] with per_class
    in_sample: float  # their OOF mIoU, on the images they were chosen on (optimistic)
    nested: float  # OOF mIoU where each fold is scored with the weights chosen on the other folds
    fold_weights: dict[int, np.ndarray]  # the weights chosen without each fold
    table: pd.DataFrame  # every per-run weight vector tried, best first (in-sample mIoU)
    method: str = "grid"  # the search that chose them: "grid" or "greedy"


def grid_step(step: float) -> float:
    """The weight grid's spacing ``1 / n`` for ``--step`` (0 < step <= 1): as given when ``1 / step`` is
    whole, else the nearest such spacing, with a warning that says so."""
    import warnings

    if not (isinstance(step, (int, float)) and math.isfinite(step) and 0 < step <= 1):
        raise ValueError(f"--step {step}: the weight grid's spacing must be in (0, 1], e.g. 0.1 or 0.25")
    ticks = max(1, round(1 / step))
    if not math.isclose(ticks * step, 1.0, rel_tol=1e-9):
        warnings.warn(f"--step {step} does not divide 1: searching with step 1/{ticks}", stacklevel=3)
    return 1 / ticks


def _simplex(members: int, step: float) -> list[np.ndarray]:
    """Weight vectors on the simplex ``step`` apart, equal weights first (added when off the grid), then by
    distance from equal weights: ties between equally good candidates go to the plainest (``FoldTable.best``
    takes the earliest), not to an extreme such as ``[0, 1]``."""
    ticks = int(round(1 / step))
    points = itertools.product(range(ticks + 1), repeat=members)
    grid = [np.array(c) / ticks for c in points if sum(c) == ticks]
    equal = np.full(members, 1.0 / members)
    grid = [g for g in grid if not np.allclose(g, equal)]
    return [equal] + sorted(grid, key=lambda g: float(np.abs(g - equal).sum()))


def search_weights(
    runs: Sequence[str | os.PathLike] | OofRuns,
    step: float = 0.1,
    per_class: bool = False,
    allow_partial: bool = False,
    per_image: int | None = PER_IMAGE,
    method: str = "auto",
) -> WeightSearch:
    """Search of run weights by OOF mIoU, with the nested-by-folds score next to the in-sample one (module
    docstring).

    ``method``: ``grid`` scores every weight vector on the simplex ``step`` apart; ``greedy`` is forward
    selection with replacement (Caruana et al. 2004): ``1 / step`` picks, each adding the run that helps
    most, so its cost grows with the runs, not with the grid; ``auto`` (default) is the grid while it has at
    most ``GRID_LIMIT`` vectors (up to 4 runs at step 0.1), greedy beyond.

    One pass over the OOF files keeps a stratified sample of ``per_image`` labelled pixels per image
    (``oof_sample``; ``None``: every pixel), on which the candidates are scored with a few matrix products;
    the scores are those of the sample (an unbiased estimate of the full-pixel ones).

    ``per_class``: then, starting from the best per-run weights, each class's column of weights is chosen on
    its own by the same method (the other classes keep the per-run weights), and the columns together are
    kept only if they beat the per-run weights. The nested score repeats the whole search without each fold.
    """
    if method not in SEARCHES:
        raise ValueError(f"unknown weight search {method!r}: use one of {SEARCHES}")
    step = grid_step(step)
    oof = opened(runs, allow_partial)
    members, classes = len(oof.runs), oof.num_classes
    if members < 2:
        raise ValueError("weight search needs at least two runs")
    sample = sample_oof(oof, per_image or np.iinfo(np.int64).max)
    grid = [_key(g) for g in _simplex(members, step)]
    greedy = method == "greedy" or (method == "auto" and len(grid) > GRID_LIMIT)
    per_run = FoldTable(classes, oof.ignore_index)
    bases = {None: None, **{f: f for f in nested_folds(sample)}}

    def score(keys: list) -> None:
        _add_counts(per_run, vote_counts(sample, np.array(keys)), keys)

    if greedy:
        chosen = _forward(members, _picks(step), bases, {b: grid[0] for b in bases}, per_run, score)
    else:
        score(grid)
        chosen = {b: per_run.best(grid, without=b) for b in bases}
    chosen = {b: np.array(k) for b, k in chosen.items()}
    if per_class:
        chosen = _per_class(sample, chosen, grid if not greedy else _picks(step), oof.ignore_index)
    final = FoldTable(classes, oof.ignore_index)
    stacked = np.stack([class_weights(w, members, classes) for w in chosen.values()])
    for fold, matrices in vote_counts(sample, stacked).items():
        for b, matrix in zip(chosen, matrices):
            if b is None:
                final.add_counts(fold, "in", matrix)
            if b == fold:
                final.add_counts(fold, "nested", matrix)
    tried = list(dict.fromkeys(k for _, k in per_run.counts))  # in the order scored
    names = [f"w_{r.name}" for r in oof.runs]
    table = pd.DataFrame([{**dict(zip(names, w)), "miou": per_run.miou(w)} for w in tried])
    return WeightSearch(
        chosen[None],
        final.miou("in"),
        final.miou("nested"),
        {f: chosen[f] for f in bases if f is not None},
        table.sort_values("miou", ascending=False, kind="stable"),
        "greedy" if greedy else "grid",
    )


def _key(weights: Any) -> tuple[float, ...]:
    """A weight vector as a table key (rounded, so equal vectors reached two ways are one candidate)."""
    return tuple(np.round(np.asarray(weights, dtype=np.float64), 12).tolist())


def _picks(step: float) -> int:
    return max(1, int(round(1 / step)))


def _add_counts(table: FoldTable, counts: dict[int, np.ndarray], candidates: Sequence[Any]) -> None:
    for fold, matrices in counts.items():
        for candidate, matrix in zip(candidates, matrices):
            table.add_counts(fold, candidate, matrix)


def _forward(
    members: int,
    picks: int,
    paths: dict[Hashable, int | None],
    starts: dict[Hashable, tuple],
    table: FoldTable,
    score: Callable[[list], None],
    wrap: Callable[[Hashable, tuple], Hashable] = lambda path, w: w,
) -> dict[Hashable, tuple]:
    """Forward selection with replacement along several paths at once: path ``p`` chooses without fold
    ``paths[p]``, its table key for weights ``w`` is ``wrap(p, w)``. Each step every path tries adding each
    run once more, and all the paths' new candidates are scored in one batch (``score``). A path ends at the
    best weights it passed through, or at its start ``starts[p]`` (scored first) when none beats it; ties go
    to the weights nearest the start (the plainest), as in the grid."""
    unit = np.eye(members, dtype=np.int64)
    counts = {p: np.zeros(members, np.int64) for p in paths}
    visited = {p: [starts[p]] for p in paths}
    seen: set = set()

    def best(p: Hashable, options: list[tuple]) -> tuple:
        near = sorted(options, key=lambda w: float(np.abs(np.subtract(w, starts[p])).sum()))
        return near[[wrap(p, w) for w in near].index(table.best([wrap(p, w) for w in near], paths[p]))]

    for step in range(picks + 1):
        options = {p: [_key(o / o.sum()) for o in c + unit] for p, c in counts.items()} if step else visited
        new = [k for k in dict.fromkeys(wrap(p, w) for p, ws in options.items() for w in ws) if k not in seen]
        if new:
            score(new)
            seen.update(new)
        for p, ws in options.items() if step else ():
            w = best(p, ws)
            counts[p] = counts[p] + unit[ws.index(w)]
            visited[p].append(w)
    return {p: best(p, visited[p]) for p in paths}


def _per_class(sample: OofSample, bases: dict, search: list | int, ignore_index: int | None) -> dict:
    """Per base (``None``: all folds; ``f``: every fold but f), each class's weight column chosen on the folds
    that base may see, the others kept at the base's per-run weights. ``search``: the grid's keys, or the
    number of greedy picks."""
    classes, members = sample.num_classes, len(next(iter(bases.values())))
    out = {}
    shared: dict[tuple, list] = {}  # bases often share weights: one table and search per distinct one
    for b, base in bases.items():
        shared.setdefault(_key(base), []).append(b)
    for key, group in shared.items():
        full = class_weights(np.array(key), members, classes)
        table = FoldTable(classes, ignore_index)

        def score(keys: list, full: np.ndarray = full, table: FoldTable = table) -> None:
            _add_counts(table, column_counts(sample, full, [(c, np.array(w)) for c, w in keys]), keys)

        paths = {(b, c): b for b in group for c in range(classes)}
        starts = {p: key for p in paths}
        if isinstance(search, int):
            found = _forward(members, search, paths, starts, table, score, lambda p, w: (p[1], w))
        else:
            candidates = [(c, w) for c in range(classes) for w in [key, *(g for g in search if g != key)]]
            score(candidates)  # ties keep the base: its column is each class's first candidate
            found = {p: table.best([k for k in candidates if k[0] == p[1]], b)[1] for p, b in paths.items()}
        for b in group:
            out[b] = full.copy()
            for c in range(classes):
                out[b][:, c] = found[(b, c)]
    return _keep_if_better(sample, bases, out, ignore_index)


def _keep_if_better(sample: OofSample, bases: dict, found: dict, ignore_index: int | None) -> dict:
    """Columns chosen one class at a time (the others at the base) can lower the joint score when put
    together: per base, the per-class weights are kept only if together they beat the per-run weights on
    the folds that base may see (ties keep the per-run ones)."""
    members, classes = len(next(iter(bases.values()))), sample.num_classes
    options = {(b, "base"): class_weights(w, members, classes) for b, w in bases.items()}
    options |= {(b, "found"): w for b, w in found.items()}
    table = FoldTable(classes, ignore_index)
    _add_counts(table, vote_counts(sample, np.stack(list(options.values()))), list(options))
    return {b: options[table.best([(b, "base"), (b, "found")], b)] for b in bases}


def save_weights(
    path: str | os.PathLike,
    found: WeightSearch,
    oof: OofRuns,
    overwrite: bool = False,
    **settings: Any,
) -> None:
    """``weights.json``: searched weights by run name, their classes, scores and provenance (read by
    ``ensemble --weights-file``)."""
    data = {
        "runs": [info.name for info in oof.infos],
        "class_names": list(oof.class_names),
        "weights": found.weights.tolist(),
        "oof_miou_in_sample": found.in_sample,
        "oof_miou_nested": found.nested,
        provenance.KEY: provenance.record(
            "weights", oof.infos, oof.class_names, partial=oof.partial, **settings
        ),
    }
    atomic_write_text(path, json.dumps(data, indent=2), overwrite)
