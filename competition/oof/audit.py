"""Label audit: rank training images by how much their out-of-fold prediction disagrees with their label.

An image's OOF prediction comes from models that never trained on it, so a label the models confidently
contradict (an object given another class, a missed or invented object) stands out. The score of an image is
the mean cross-entropy of its label under the OOF probabilities (soft vote of the runs) over its labelled
pixels; the CSV also gives its pixel error and most frequent confusion (label class -> predicted class).

``competition audit --runs ... --out DIR`` writes ``DIR/audit.csv`` (every training image, worst first) and
``DIR/gallery/`` (image | label | OOF prediction panels of the worst N). Images judged mislabelled go into an
exclude list of file names, for ``competition folds --exclude FILE`` or the config's ``data.exclude``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..core.checkpoint import fold_dirs, read_run_config
from ..core.io import atomic_write_csv, check_writable
from ..data.splits import data_files
from ..predictions.oof import OofRuns
from .scores import audit_table, write_gallery


def run_audit(
    runs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    weights: Sequence[float] | None = None,
    gallery: int = 24,
    overwrite: bool = False,
    allow_partial: bool = False,
) -> tuple[pd.DataFrame, list[Path]]:
    """Write ``audit.csv`` and the gallery of the worst ``gallery`` images; returns both. Runs whose folds
    did not all finish are refused unless ``allow_partial``."""
    out_dir = Path(out_dir)
    check_writable(out_dir / "audit.csv", overwrite)
    # one fold's config stands for the data: every image's file name is then checked against the OOF files
    files, root = data_files(read_run_config(fold_dirs(runs[0])[0]))
    oof = OofRuns(runs, allow_partial)  # opened once for the table and the gallery
    table = audit_table(oof, files, weights)
    atomic_write_csv(out_dir / "audit.csv", table)
    return table, write_gallery(oof, table, root, out_dir / "gallery", gallery, weights)
