"""The ``evaluate`` stage: one opening of the runs' OOF files for everything asked of them: the OOF table
(per fold, per run, and the runs' votes), optionally the ensemble-weight search (its weights saved), the
post-processing tuning and the dense-CRF choice, each with its nested score."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..core.checkpoint import read_run_config
from ..core.io import check_writable
from ..data.splits import data_files
from ..predictions import provenance
from ..predictions.crf import densecrf_module
from ..predictions.oof import OofRuns
from ..predictions.postprocess import PostProcess
from .scores import OofScorer
from .tune import CrfTuned, Tuned, Tuner, tune_crf
from .weights import WeightSearch, save_weights, search_weights


@dataclass
class Evaluation:
    """What ``evaluate`` found: the OOF table, and each optional result (``None`` when not asked)."""

    scores: pd.DataFrame
    search: WeightSearch | None = None
    tuned: Tuned | None = None
    crf: CrfTuned | None = None


def evaluate(
    runs: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    allow_partial: bool = False,
    search: str | None = None,
    step: float = 0.1,
    per_class: bool = False,
    sample_pixels: int | None = 2048,
    save_weights_to: str | os.PathLike | None = None,
    tune_postprocess: str | os.PathLike | None = None,
    tune_crf_to: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Evaluation:
    """Score ``runs`` out-of-fold with ``weights``; with ``search`` (``auto``, ``grid`` or ``greedy``) first
    choose the weights (``search_weights``; saved to ``save_weights_to``), which the table, the tuning and
    the CRF then use, their nested scores the weights chosen without each fold. Output files are checked
    before any work (``overwrite`` to replace them)."""
    for out in (save_weights_to, tune_postprocess, tune_crf_to):
        if out is not None:
            check_writable(out, overwrite)
    if tune_crf_to is not None:
        densecrf_module()  # a missing [crf] extra fails here, before a pass over the data
    oof = OofRuns(runs, allow_partial)
    found = fold_weights = None
    if search:
        found = search_weights(oof, step, per_class, allow_partial, sample_pixels, search)
        weights, fold_weights = found.weights, found.fold_weights
        if save_weights_to is not None:
            settings = {"step": step, "per_class": per_class, "search": found.method}
            save_weights(save_weights_to, found, oof, overwrite, **settings)
    scorer = OofScorer(oof, weights)
    tuner = Tuner(oof, weights, fold_weights) if tune_postprocess is not None else None
    oof.feed(*([scorer] if tuner is None else [scorer, tuner]))  # one pass: the table and the candidates
    tuned = tuner.result() if tuner is not None else None
    if tuned is not None:
        tuned.postprocess.save(tune_postprocess, overwrite)
    crf = _crf_file(oof, weights, fold_weights, tune_crf_to, overwrite) if tune_crf_to is not None else None
    return Evaluation(scorer.result().frame(), found, tuned, crf)


def _crf_file(oof: OofRuns, weights: Any, fold_weights: Any, out: Any, overwrite: bool) -> CrfTuned:
    """``tune_crf`` on the runs' own images, its choice saved as a ``postprocess.json`` with provenance."""
    # one fold's config stands for the data: tune_crf checks every image's file name against the OOF files
    files, root = data_files(read_run_config(oof.infos[0].fold_dirs()[0]))
    tuned = tune_crf(oof, files, root, weights, fold_weights=fold_weights)
    chosen = None if tuned.settings is None else asdict(tuned.settings)
    scores = {"oof_miou_plain": tuned.baseline, "oof_miou_in_sample": tuned.in_sample}
    scores["oof_miou_nested"] = tuned.nested
    w = None if weights is None else [float(v) for v in np.ravel(weights)]
    block = provenance.record(
        "postprocess", oof.infos, oof.class_names, weights=w, nested_weights=fold_weights is not None,
        partial=oof.partial,
    )  # fmt: skip
    PostProcess(oof.class_names, scores=scores, provenance=block, crf=chosen).save(out, overwrite)
    return tuned
