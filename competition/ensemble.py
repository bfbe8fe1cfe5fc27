"""Ensembles evaluated out-of-fold, ensemble-weight search, and averaging of saved probability files.

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
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import provenance
from .checkpoint import CheckpointError
from .io import atomic_write_text
from .oof import OofRuns, check_same_classes, join_images, stored_class_names, stored_images
from .oof_sample import OofSample, column_counts, sample_oof, vote_counts
from .provenance import ProvenanceError
from .runtime import check_weights
from .tuning import FoldTable, nested_folds
from .voting import class_weights

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
    runs: Sequence[str | os.PathLike],
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
    oof = OofRuns(runs, allow_partial)
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


@dataclass
class ProbFiles:
    """``predict --save-probs`` files opened together (``read_prob_files``), joined by image file name."""

    paths: list[Path]
    files: list[Any]
    class_names: list[str]
    blocks: list[dict[str, Any] | None]  # each file's provenance (None: written before provenance)
    keys: list[list[str]] | None = None  # per file, the key of each wanted image (read_prob_files' order)

    def iterate(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, list[np.ndarray]]]:
        """``(key, [probabilities of each file])`` per wanted image, in ``read_prob_files``' order (``keys``:
        the same key in every file, for files made together); the key is the first file's."""
        rows = zip(*self.keys) if keys is None else ([k] * len(self.files) for k in keys)
        for row in rows:
            probs = [f[f"pred__{k}"] for f, k in zip(self.files, row)]
            if len({p.shape for p in probs}) > 1:
                raise CheckpointError(
                    f"probability maps of {row[0]} differ in shape: {[p.shape for p in probs]}"
                )
            yield row[0], probs

    def background(self) -> int | None:
        """The background class id of the runs the files were made from (``None``: none; files written
        before it was recorded: 0); files that differ are refused, as for runs."""
        return provenance.agreed_background(
            {f"{r['name']} of {p}": provenance.record_background(r)
             for p, b in zip(self.paths, self.blocks) for r in (b or {}).get("runs", [])}
        )  # fmt: skip

    def partial(self) -> list[str]:
        """The incomplete-run problems the files were made with (``predict --allow-partial``)."""
        return [f"{p}: {x}" for p, b in zip(self.paths, self.blocks) for x in (b or {}).get("partial", [])]


def read_prob_files(
    paths: Sequence[str | os.PathLike], images: Sequence[tuple[str, tuple[int, int] | None]], what: str
) -> ProbFiles:
    """Open ``predict --save-probs`` files: their common class names are checked, and every wanted image
    (``(file name, (height, width))``, from ``what``, e.g. the test json) must be in every file at that size,
    found by its file name (``oof.join_images``), before anything is read."""
    files = [np.load(p) for p in paths]
    names = check_same_classes([(str(p), stored_class_names(f, p)) for p, f in zip(paths, files)])
    keys = [join_images(images, stored_images(f, p), p, what) for p, f in zip(paths, files)]
    return ProbFiles([Path(p) for p in paths], files, names, [provenance.from_npz(f) for f in files], keys)


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


def load_weights(path: str | os.PathLike, probs: ProbFiles) -> np.ndarray:
    """The weights of ``weights.json`` (``save_weights``) in the order of the probability files, matched by
    the run that made each file (its provenance), in any order (``_weights_in_order``)."""
    members = []
    for file, block in zip(probs.paths, probs.blocks):
        if len(provenance.run_names(block)) != 1:
            raise ProvenanceError(
                f"{file} was made by {provenance.describe(block)}: weights.json weighs single runs, so each "
                "probability file must come from one run (predict --runs RUN --save-probs FILE)"
            )
        members.append((str(file), block["runs"][0]))
    return _weights_in_order(path, members, probs.class_names)


def weights_for_runs(path: str | os.PathLike, runs: Sequence[str | os.PathLike]) -> np.ndarray:
    """The weights of ``weights.json`` in the order of the run directories ``runs``, matched by name."""
    infos = [provenance.read_run(r) for r in runs]
    return _weights_in_order(path, [(str(i.dir), i.record()) for i in infos], infos[0].class_names)


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """``weights.json`` as written by ``evaluate --save-weights``; another file (a ``postprocess.json``, a
    bundle's manifest) or a broken one is refused in one line naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ProvenanceError(f"cannot read weights file {path}: {exc}") from None
    missing = [k for k in ("runs", "class_names", "weights") if not isinstance(data, dict) or k not in data]
    if missing:
        kind = (data.get(provenance.KEY) or {}).get("kind") if isinstance(data, dict) else None
        looks = f" (it is a {kind} file)" if kind else ""
        raise ProvenanceError(
            f"{path} is not a weights.json{looks}: it has no {missing}. Give the file written by "
            "`competition evaluate --search-weights --save-weights FILE`"
            + (", and a postprocess.json to --postprocess" if kind == "postprocess" else "")
        )
    return data


def _weights_in_order(
    path: str | os.PathLike, members: Sequence[tuple[str, dict[str, Any]]], class_names: Sequence[str] | None
) -> np.ndarray:
    """Rows of ``weights.json`` for ``members`` (``(what, run record)``): a member of a run the weights were
    not chosen for, a run without a member, two members of one run, or a member of a run with the same name
    but another config is an error naming both sides."""
    data = read_weights_file(path)
    if class_names is not None and data["class_names"] != list(class_names):
        raise ProvenanceError(
            f"{path} holds weights for classes {data['class_names']}, {members[0][0]} has {list(class_names)}"
        )
    weights = check_weights(data["weights"], str(path))
    chosen = data.get(provenance.KEY, {}).get("runs") or [{"name": Path(r).name} for r in data["runs"]]
    if len(weights) != len(chosen):
        raise ProvenanceError(f"{path} holds {len(weights)} weight rows for {len(chosen)} runs")
    index = {r["name"]: k for k, r in enumerate(chosen)}
    order = []
    for what, run in members:
        name = run["name"]
        if name not in index:
            raise ProvenanceError(
                f"{what} comes from run {name!r}; {path} has weights for runs {list(index)}"
            )
        want, have = chosen[index[name]].get("config_hash"), run.get("config_hash")
        if want and have and want != have:
            raise ProvenanceError(
                f"{what} comes from run {name!r} with config {have}, but {path} chose weights for run "
                f"{name!r} with config {want}: another run of the same name"
            )
        if index[name] in order:
            raise ProvenanceError(f"two inputs come from run {name!r}")
        order.append(index[name])
    unused = [r["name"] for k, r in enumerate(chosen) if k not in order]
    if unused:
        raise ProvenanceError(
            f"{path} chose weights for runs {[r['name'] for r in chosen]} together; nothing given of {unused}"
        )
    return weights[order]


def ensemble_probs(
    paths: Sequence[str | os.PathLike],
    test_json: str | os.PathLike,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    weights_file: str | os.PathLike | None = None,
    vote: str = "soft",
    fmt: str = "boostcamp",
    size: int | None = 256,
    postprocess: str | os.PathLike | None = None,
    overwrite: bool = False,
    allow_partial: bool = False,
) -> Path:
    """Vote saved probability files (``predict --save-probs``) into a validated submission, with its
    provenance beside it. ``weights_file`` (``weights.json``) is matched to the files by run name;
    ``size=None`` writes each mask at its image's size from ``test_json``. Files made from unfinished runs
    (``predict --allow-partial``) are refused unless ``allow_partial``."""
    from .data.coco import load_coco
    from .postprocess import PostProcess
    from .submission import submission_rows, write_submission
    from .voting import vote_mask

    coco = load_coco(test_json, None)
    images = [(info.file_name, (info.height, info.width)) for info in coco.images.values()]
    files = read_prob_files(paths, images, str(test_json))
    what = "probability files made from incomplete runs"
    partial = provenance.accept_partial(files.partial(), allow_partial, what, "Make them from finished runs")
    if weights_file is not None:
        weights = load_weights(weights_file, files)
    background = files.background()
    post = PostProcess.load(postprocess, files.class_names, background) if postprocess else None
    if post is not None and post.crf is not None:
        raise ValueError(
            f"{postprocess} sets a dense CRF, which needs the images: apply it with predict --postprocess"
        )
    rows = []
    for (_, probs), info in zip(files.iterate(), coco.images.values()):
        mask = vote_mask(probs, weights, vote, size or (info.height, info.width))
        rows += submission_rows(info.file_name, post(mask) if post else mask, fmt, size, background)
    expected = [info.file_name for info in coco.images.values()]
    shapes = {info.file_name: (info.height, info.width) for info in coco.images.values()}
    path = write_submission(
        rows, out, expected, len(files.class_names), fmt, size, overwrite, shapes, background
    )
    block = {
        "kind": "submission",
        "made_from": [{"file": str(p), "provenance": b} for p, b in zip(files.paths, files.blocks)],
        "class_names": files.class_names,
        "vote": vote,
        "weights": None if weights is None else np.asarray(weights).tolist(),
        "weights_file": str(weights_file) if weights_file else None,
        "format": fmt,
        "size": size,
        "postprocess": str(postprocess) if postprocess else None,
        "partial": partial,
    }
    provenance.write_sidecar(path, block)
    return path
