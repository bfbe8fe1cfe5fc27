"""What made an artifact, and the checks every consumer runs before it joins artifacts.

Every file the pipeline derives from trained runs carries a ``provenance`` block (a JSON object: in a json
file as the key ``provenance``, in an ``.npz`` as the array ``provenance`` holding the JSON text):

- ``kind``: ``oof``, ``probs``, ``pseudo``, ``weights``, ``postprocess`` or ``submission``;
- ``runs``: per run its ``name``, ``dir``, ``config_hash`` (the run's resolved config without the keys a
  resume may change), ``folds_hash`` (SHA-256 of the folds file it trained on), ``folds`` (the fold numbers
  of that file) and per fold the epochs finished of those planned;
- ``class_names``, the inference settings where there are any (``size``, ``tta``, ``scales``, ...), and
  ``partial``: the problems a user accepted with ``--allow-partial`` (empty when every fold finished).

``read_run`` reads a run directory into a ``RunInfo``; ``check_complete`` refuses runs whose folds did not
all finish, or that lack folds their folds file lists, naming them (``allow_partial`` turns the refusal into
a warning that the output records).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.checkpoint import (
    BEST_META,
    CONFIG_FILE,
    CheckpointError,
    fold_folders,
    read_best_meta,
    read_run_config,
)
from ..core.config import Config
from ..core.io import atomic_write_text, file_hash

KEY = "provenance"
# keys a resume may change (they do not change what the run learns): left out of the config hash
VOLATILE_TRAIN_KEYS = ("workers", "progress", "loggers", "device", "val_batch_size", "threads", "time_limit")
LATER_KEYS = {
    ("train", "patience"): None,
    ("train", "init_from"): None,
    ("train", "init_any_folds"): False,
    ("train", "keep"): "best",
    ("train", "swa_epochs"): None,
    ("data", "background"): "auto",
    ("augment", "scale"): None,
}  # (section, key): default; hashed only when set, so runs made before them keep their hash


class ProvenanceError(CheckpointError):
    """Artifacts that do not belong together, or runs that did not finish."""


def config_hash(cfg: Config) -> str:
    """SHA-256 (first 16 hex digits) of what a run learns from: its config without ``output_dir`` and the
    training keys a resume may change."""
    raw = cfg.model_dump(mode="json")
    raw.pop("output_dir", None)
    for key in VOLATILE_TRAIN_KEYS:
        raw["train"].pop(key, None)
    for (section, key), default in LATER_KEYS.items():
        if raw[section].get(key, default) == default:
            raw[section].pop(key, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def folds_record(path: str | os.PathLike) -> dict[str, Any]:
    """``folds_hash`` and ``folds`` (the validation fold numbers) of a folds file, for ``best.json``."""
    from ..data.splits import read_folds_table, validation_folds

    return {"folds_hash": file_hash(path), "folds": validation_folds(read_folds_table(path))}


@dataclass
class FoldInfo:
    fold: int
    dir: Path
    epochs_done: int
    epochs: int
    has_best: bool
    stopped_early: bool = False  # train.patience ran out

    @property
    def finished(self) -> bool:
        return self.has_best and (self.epochs_done >= self.epochs or self.stopped_early)


@dataclass
class RunInfo:
    """A run directory as its files describe it (``read_run``)."""

    dir: Path
    name: str
    config_hash: str
    folds_hash: str | None
    expected: list[int] | None  # the folds of its folds file (None: not known)
    folds: dict[int, FoldInfo] = field(default_factory=dict)
    class_names: list[str] | None = None  # from best.json (None: no fold has a best checkpoint yet)
    background: int | None = 0  # the background class id (data.background), None without one

    def problems(self) -> list[str]:
        """Why this run is incomplete (empty when every fold of its folds file finished)."""
        out = [
            f"{self.dir}: fold {f.fold} finished {f.epochs_done} of {f.epochs} epochs"
            + ("" if f.has_best else " (no best checkpoint)")
            for f in self.folds.values()
            if not f.finished
        ]
        missing = sorted(set(self.expected or []) - set(self.folds))
        if missing:
            out.append(
                f"{self.dir}: fold(s) {missing} of its folds file {sorted(self.expected or [])} missing"
            )
        return out

    def fold_dirs(self) -> list[Path]:
        """Fold directories with a best checkpoint, in fold order."""
        return [f.dir for _, f in sorted(self.folds.items()) if f.has_best]

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dir": str(self.dir.resolve()),
            "config_hash": self.config_hash,
            "folds_hash": self.folds_hash,
            "folds": self.expected,
            "epochs": {str(k): [f.epochs_done, f.epochs] for k, f in sorted(self.folds.items())},
        } | ({"background": None} if self.background is None else {})  # only when none: see record_background


def patience_spent(miou: Sequence[float], patience: int | None) -> bool:
    """Whether ``train.patience`` epochs have passed since the best of the per-epoch mIoUs ``miou``."""
    scores = np.asarray(miou, dtype=float)
    if not patience or not len(scores) or np.isnan(scores).all():
        return False
    return len(scores) - (int(np.nanargmax(scores)) + 1) >= patience


def _progress(fold_dir: Path) -> tuple[int, list[float]]:
    """Epochs finished and their validation mIoU, from ``metrics.csv``."""
    path = fold_dir / "metrics.csv"
    if not path.is_file():
        return 0, []
    table = pd.read_csv(path)
    done = int(table["epoch"].max()) if len(table) else 0
    return done, table["miou"].tolist() if "miou" in table else []


def read_run(path: str | os.PathLike) -> RunInfo:
    """A run directory (``fold<k>/`` inside: ``checkpoint.fold_folders``) or one fold directory, with every
    fold's progress. Every fold's record must agree (``check_folds_agree``): one run, one config, one folds
    file."""
    path = Path(path)
    single = (path / CONFIG_FILE).is_file()
    if single:
        meta = read_best_meta(path) if (path / BEST_META).is_file() else {}
        dirs = {int(meta.get("fold", 0)): path}
    else:
        dirs = fold_folders(path)
    if not dirs:
        raise CheckpointError(f"no trained fold (fold<k>/{CONFIG_FILE}) in {path}")
    records = {fold: _fold_record(d) for fold, d in dirs.items()}
    check_folds_agree(path, records)
    # the first fold stands for the run only after check_folds_agree compared every fold with it
    cfg, meta = records[min(records)]["cfg"], next((r["meta"] for r in records.values() if r["meta"]), {})
    known = next((r for r in records.values() if r["folds_hash"] is not None), records[min(records)])
    run = RunInfo(path, cfg.name, config_hash(cfg), known["folds_hash"], None if single else known["folds"])
    run.background = cfg.data.background_index()
    run.class_names = meta.get("classes")
    for fold, d in dirs.items():
        rec = records[fold]
        done, miou = _progress(d)
        stopped = patience_spent(miou, rec["cfg"].train.patience)
        run.folds[fold] = FoldInfo(fold, d, done, rec["cfg"].train.epochs, bool(rec["meta"]), stopped)
    return run


# keys a fold may hold differently from the others and still be the same run (a resume may change them)
FOLD_MAY_DIFFER = ("patience", "checkpoint_every")


def _fold_record(fold_dir: Path) -> dict[str, Any]:
    """What one fold folder says it trained: its config (and the hash of what must agree across folds), its
    ``best.json`` and the folds file it trained on (``best.json``'s record; for a fold written before
    provenance, the folds file as it is now)."""
    cfg = read_run_config(fold_dir)
    meta = read_best_meta(fold_dir) if (fold_dir / BEST_META).is_file() else {}
    folds_hash, folds = meta.get("folds_hash"), meta.get("folds")
    if meta and folds is None and Path(cfg.data.folds).is_file():
        folds_hash, folds = folds_record(cfg.data.folds).values()
    agreed = cfg.model_copy(update={"train": cfg.train.model_copy(update=dict.fromkeys(FOLD_MAY_DIFFER))})
    return {"cfg": cfg, "meta": meta, "hash": config_hash(agreed), "folds_hash": folds_hash, "folds": folds}


def check_folds_agree(run_dir: Path, records: Mapping[int, Mapping[str, Any]]) -> None:
    """Refuse a run whose folds do not describe one run: every fold's config (less ``FOLD_MAY_DIFFER``),
    folds file hash and fold list is compared with the first fold's, not only the first fold read. The error
    names both folds, both values, and for configs the keys that differ."""
    from ..core.config_file import flat_params

    (first, ref), *others = records.items()
    for fold, rec in others:
        if rec["hash"] != ref["hash"]:
            a, b = (flat_params(r["cfg"].model_dump(mode="json")) for r in (ref, rec))
            keys = sorted(k for k in a.keys() | b.keys() if k != "output_dir" and a.get(k) != b.get(k))
            raise ProvenanceError(
                f"{run_dir}: fold {fold} was trained with another config than fold {first} (config "
                f"{rec['hash']} vs {ref['hash']}; they differ in {keys}): not one run. Retrain fold {fold} "
                f"with fold {first}'s config, or move it to a run of its own"
            )
        for key, what in (("folds_hash", "folds file"), ("folds", "fold list")):
            if None not in (rec[key], ref[key]) and rec[key] != ref[key]:
                raise ProvenanceError(
                    f"{run_dir}: fold {fold} trained on another {what} than fold {first} ({rec[key]} vs "
                    f"{ref[key]}): its validation images may be another fold's training images, so the run's "
                    "out-of-fold predictions do not cover the data once. Retrain the folds on one folds file"
                )


def common_background(runs: Sequence[RunInfo]) -> int | None:
    """The background class id every run has (``None``: none); see ``agreed_background``."""
    return agreed_background({str(run.dir): run.background for run in runs})


def agreed_background(backgrounds: Mapping[str, int | None]) -> int | None:
    """The one background class id of runs (described -> id; ``None``: none; no runs: 0). Runs that differ
    are refused, since the same class names mean different things with and without a background class."""
    values = set(backgrounds.values())
    if len(values) > 1:
        described = ", ".join(f"{d}: {'none' if b is None else b}" for d, b in backgrounds.items())
        raise ProvenanceError(f"runs differ in data.background ({described}): their class 0 is not the same")
    return values.pop() if values else 0


def record_background(record: Mapping[str, Any]) -> int | None:
    """The background class id of a run record (``RunInfo.record``: the key is written only when none)."""
    return record.get("background", 0)


def check_complete(runs: Sequence[RunInfo], allow_partial: bool = False) -> list[str]:
    """Refuse runs that did not finish (a ``ProvenanceError`` naming every unfinished or missing fold);
    with ``allow_partial`` warn instead and return the problems, for the output to record."""
    problems = [p for run in runs for p in run.problems()]
    for run in runs:
        if not run.fold_dirs():
            raise CheckpointError(f"no trained fold (fold*/{BEST_META}) in {run.dir}")
    fix = "Finish them (competition train --resume)"
    return accept_partial(problems, allow_partial, "incomplete runs", fix)


def accept_partial(problems: list[str], allow_partial: bool, what: str, fix: str) -> list[str]:
    """Refuse ``problems`` (one ``ProvenanceError`` listing them, saying how to ``fix`` them) unless
    ``allow_partial``; then warn about each and return them, for the output to record."""
    if problems and not allow_partial:
        raise ProvenanceError(
            f"{what}: " + "; ".join(problems) + f". {fix}, or pass --allow-partial to use what there is (the "
            "output records it)"
        )
    for p in problems:
        warnings.warn(f"--allow-partial: {p}", stacklevel=3)
    return problems


def complete_runs(
    runs: Iterable[str | os.PathLike], allow_partial: bool = False
) -> tuple[list[RunInfo], list]:
    """``read_run`` of every path, then ``check_complete``: the runs and the accepted problems."""
    infos = [read_run(r) for r in runs]
    return infos, check_complete(infos, allow_partial)


def record(kind: str, runs: Sequence[RunInfo], class_names: Sequence[str], **settings: Any) -> dict[str, Any]:
    """The ``provenance`` block of an artifact made from ``runs``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        made_by = version("smp-unet3p")
    except PackageNotFoundError:  # running from a source tree
        made_by = "source"
    return {
        "kind": kind,
        "made": datetime.datetime.now().isoformat(timespec="seconds"),
        "smp_unet3p": made_by,
        "runs": [r.record() for r in runs],
        "class_names": list(class_names),
        **settings,
    }


def to_npz(block: Mapping[str, Any]) -> np.ndarray:
    return np.array(json.dumps(block))


def from_npz(data: Any) -> dict[str, Any] | None:
    """The provenance block of an opened ``.npz`` (``None`` for a file written before provenance)."""
    return json.loads(str(data[KEY].reshape(-1)[0])) if KEY in data.files else None


def run_names(block: Mapping[str, Any] | None) -> list[str]:
    return [r["name"] for r in (block or {}).get("runs", [])]


def describe(block: Mapping[str, Any] | None) -> str:
    """One line saying what made an artifact (for error messages)."""
    if not block:
        return "unknown runs (written before provenance)"
    return "runs " + ", ".join(f"{r['name']} (config {r['config_hash']})" for r in block.get("runs", []))


def sidecar(path: str | os.PathLike) -> Path:
    """Where the provenance of a file without room for it (a submission CSV) is written:
    ``submission.csv`` -> ``submission.provenance.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.provenance.json")


def write_sidecar(path: str | os.PathLike, block: Mapping[str, Any]) -> Path:
    return atomic_write_text(sidecar(path), json.dumps(block, indent=1))
