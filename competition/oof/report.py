"""The ``report`` stage: one self-contained HTML page about a set of runs (every image inline as a PNG data
URI, no external file, script or font), to open in any browser or attach to a message.

Sections: config summary; training curves of every fold; best epoch per fold; the OOF table (each run's fold
ensemble per fold and overall, and the soft / hard vote of the runs); per-class IoU (table and bar chart) and
the row-normalised confusion matrix of the OOF soft vote; the worst OOF images (image | label | prediction);
with a submission, its class pixel distribution next to the training labels'.
"""

from __future__ import annotations

import datetime
import html
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.checkpoint import fold_dirs, read_best_meta, read_run_config
from ..core.html import img, png, pyplot, write_page
from ..core.html import table as html_table
from ..core.io import check_writable
from ..core.metrics import iou_of
from ..data.splits import data_files
from ..predictions.oof import OofRuns
from ..predictions.submission import class_pixel_counts
from .scores import score_oof, write_gallery


def config_summary(runs: Sequence[Path]) -> pd.DataFrame:
    rows = []
    for run in runs:
        cfg = read_run_config(fold_dirs(run)[0])
        rows.append(
            {
                "run": run.name,
                "arch": cfg.model.arch,
                "encoder": cfg.model.encoder_name,
                "pretrained": cfg.model.encoder_weights or "none",
                "params": str(cfg.model.params or ""),
                "loss": cfg.loss.name,
                "optimizer": f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g}",
                "epochs": cfg.train.epochs,
                "batch": cfg.train.batch_size,
                "crop": cfg.augment.size or "full",
                "copy-paste": cfg.augment.copy_paste,
                "pseudo sets": len(cfg.data.extra),
            }
        )
    return pd.DataFrame(rows)


def curves_figure(runs: Sequence[Path]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.2 * len(runs)), squeeze=False)
    for (ax_miou, ax_loss), run in zip(axes, runs):
        for d in fold_dirs(run):
            if not (d / "metrics.csv").is_file():
                continue
            m = pd.read_csv(d / "metrics.csv")
            line = ax_miou.plot(m["epoch"], m["miou"], marker=".", label=d.name)[0]
            # markers, so that a run of one epoch shows its point
            colour = line.get_color()
            ax_loss.plot(m["epoch"], m["train_loss"], color=colour, marker=".", label=f"{d.name} train")
            ax_loss.plot(m["epoch"], m["val_loss"], color=colour, ls="--", marker=".", label=f"{d.name} val")
        ax_miou.set_title(f"{run.name}: validation mIoU")
        ax_loss.set_title(f"{run.name}: loss (train solid, val dashed)")
        ax_loss.set_yscale("log")
        for ax in (ax_miou, ax_loss):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        ax_miou.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def best_epochs(runs: Sequence[Path]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for d in fold_dirs(run):
            meta = read_best_meta(d)
            rows.append(
                {"run": run.name, "fold": meta["fold"], "best epoch": meta["epoch"], "mIoU": meta["miou"]}
            )
    return pd.DataFrame(rows)


def per_class_section(matrices: dict[str, np.ndarray], names: list[str]) -> str:
    plt = pyplot()
    table = pd.DataFrame({"class": names} | {run: iou_of(m) for run, m in matrices.items()})
    table["label pixels"] = next(iter(matrices.values())).sum(1)
    fig, ax = plt.subplots(figsize=(12, 3.8))
    width = 0.8 / len(matrices)
    for k, (run, m) in enumerate(matrices.items()):
        ax.bar(np.arange(len(names)) + k * width, np.nan_to_num(iou_of(m)), width, label=run)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel("OOF IoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return html_table(table) + png(fig)


def confusion_figure(matrix: np.ndarray, names: list[str], title: str) -> str:
    plt = pyplot()
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(names), 0.6 + 0.55 * len(names)))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(norm):
        if v >= 0.005:
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 else "black"
            )
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    ax.set_title(title)
    fig.colorbar(image, fraction=0.04)
    return png(fig)


def worst_images(oof: OofRuns, table: pd.DataFrame, root: Path, count: int, weights: Any) -> str:
    """The ``count`` worst rows of the audit ``table`` and their gallery panels (only those decompressed)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_gallery(oof, table, root, Path(tmp), count, weights)
        images = "".join(img(p.read_bytes(), p.stem) for p in paths)
    shown = table.head(count)[["rank", "file_name", "fold", "score", "pixel_error", "top_confusion"]]
    return html_table(shown) + images


def distribution_figure(
    submission: Path, train: np.ndarray, names: list[str], fmt: str, size: int | None, background: int | None
) -> str:
    plt = pyplot()
    test = class_pixel_counts(submission, len(names), fmt, size, background)
    fig, ax = plt.subplots(figsize=(12, 3.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, train / max(train.sum(), 1), 0.4, label="training labels (OOF targets)")
    ax.bar(x + 0.2, test / max(test.sum(), 1), 0.4, label=f"submission {submission.name}")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("share of pixels")
    ax.legend(fontsize=8)
    return png(fig)


def partial_note(problems: Sequence[str]) -> list[str]:
    """A warning paragraph for a run used with ``--allow-partial`` (nothing when it is complete)."""
    if not problems:
        return []
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return [f'<p class="partial"><b>Partial run</b> (--allow-partial): these scores cover only the folds '
            f"that finished.</p><ul class=\"partial\">{items}</ul>"]  # fmt: skip


def build_report(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    submission: str | os.PathLike | None = None,
    fmt: str = "boostcamp",
    size: int | None = 256,
    worst: int = 8,
    overwrite: bool = False,
    weights: np.ndarray | Sequence[float] | None = None,
    allow_partial: bool = False,
    extra: Sequence[str] = (),
) -> Path:
    """Write the report of ``runs`` (trained on the same folds) to ``out`` and return its path. ``weights``
    (per run, or per run and class): the vote shown, as the submission was made. ``extra``: more HTML
    sections appended (a sweep's study: ``train.trials.study_section``)."""
    out = check_writable(out, overwrite)
    runs = [Path(r) for r in runs]
    title = "Run report: " + ", ".join(r.name for r in runs)
    # one pass over the OOF files: the OOF table, the confusion matrices and the audit ranking
    cfg = read_run_config(fold_dirs(runs[0])[0])
    files, root = data_files(cfg)  # the data the runs trained on
    oof = OofRuns(runs, allow_partial)  # opened once for the scores and the gallery
    scores = score_oof(oof, weights, files=files)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">written {datetime.datetime.now():%Y-%m-%d %H:%M} from '
        f"{html.escape(', '.join(str(r) for r in runs))}</p>",
        "<h2>Config</h2>",
        html_table(config_summary(runs)),
        "<h2>Training curves</h2>",
        curves_figure(runs),
        "<h2>Best epoch per fold</h2>",
        html_table(best_epochs(runs)),
        "<h2>Out-of-fold scores</h2>",
        '<p class="note">Each image is scored by the fold model that never trained on it: the CV score of '
        "each run's fold ensemble, and of the runs' soft / hard vote.</p>",
        *partial_note(scores.partial),
        html_table(scores.frame()),
    ]
    names = scores.class_names
    matrices = {m: scores.table.matrix(m) for m in scores.runs + scores.votes[:1]}  # runs and soft vote
    combined = (scores.votes or scores.runs)[0]
    parts += [
        "<h2>Per-class IoU (OOF)</h2>",
        per_class_section(matrices, names),
        "<h2>Confusion matrix (OOF, rows sum to 1)</h2>",
        confusion_figure(matrices[combined], names, f"{combined}: label -> predicted"),
        f"<h2>Worst {worst} OOF images</h2>",
        '<p class="note">Ranked by the mean cross-entropy of the label under the OOF prediction '
        "(<code>competition audit</code> lists every image).</p>",
        worst_images(oof, scores.audit, root, worst, weights),
    ]
    if submission is not None:
        train_pixels = matrices[combined].sum(1)
        parts += [
            "<h2>Submission class distribution</h2>",
            distribution_figure(
                Path(submission), train_pixels, names, fmt, size, cfg.data.background_index()
            ),
        ]
    return write_page(out, title, parts + list(extra))
