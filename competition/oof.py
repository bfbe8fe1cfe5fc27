"""Out-of-fold (OOF) files and saved probabilities: written streaming, read back with the checks that files
combined belong together.

``fold<k>/oof.npz`` (``train.oof``): ``pred__<id>`` (float16 ``[C, h, w]`` probabilities or uint8 ``[h, w]``
argmax), ``target__<id>`` (uint8 mask at the same size), ``image_ids``, ``class_names``, ``fold`` and
``ignore_index`` and ``provenance`` (run name, config and folds hashes, fold, size). ``predict --save-probs``
files hold ``pred__<id>``, ``image_ids``, ``class_names`` and ``provenance`` (``competition.provenance``).
Anything that combines such files (OOF evaluation, weight search, ``competition ensemble``) refuses files
whose class lists differ, naming both lists: same-sized maps of classes in another order would otherwise be
averaged channel by channel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import provenance
from .checkpoint import CheckpointError, read_best_meta
from .io import NpzStreamWriter
from .runtime import sample_id

OOF_FILE = "oof.npz"


class OofWriter:
    """Streams one fold's out-of-fold predictions into an ``.npz`` (module docstring for the keys).

    ``add`` takes probabilities (``runtime.to_probs``). With ``size`` (``train.oof_size``, 256 by default: the
    Boostcamp submission size) maps larger than that are resized to ``size x size`` (bilinear probabilities,
    nearest targets) to keep files small; OOF scores then need no access to the data.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mode: str,
        size: int | None,
        class_names: Sequence[str],
        fold: int,
        ignore_index: int,
        origin: dict[str, Any] | None = None,
    ):
        self.writer, self.mode, self.size, self.ids = NpzStreamWriter(path), mode, size, []
        self.meta = {"class_names": np.array(list(class_names)), "fold": np.array(fold)}
        self.meta["ignore_index"] = np.array(ignore_index)
        block = {"kind": "oof", "fold": fold, "size": size, **(origin or {})}
        self.meta[provenance.KEY] = provenance.to_npz(block)

    def __enter__(self) -> OofWriter:
        self.writer.__enter__()
        return self

    def add(self, batch: dict[str, Any], probs: torch.Tensor) -> None:
        masks = batch["mask"].to(probs.device)
        if self.size is not None and max(probs.shape[-2:]) > self.size:  # shrunk, never enlarged
            probs = F.interpolate(probs, size=(self.size, self.size), mode="bilinear", align_corners=False)
            masks = F.interpolate(masks[:, None].float(), size=(self.size, self.size), mode="nearest")
            masks = masks[:, 0].long()
        for image_id, p, m in zip(batch["image_id"], probs.cpu(), masks.cpu()):
            key = sample_id(image_id)
            self.ids.append(key)
            value = p.half().numpy() if self.mode == "probs" else p.argmax(0).to(torch.uint8).numpy()
            self.writer.put(f"pred__{key}", value)
            self.writer.put(f"target__{key}", m.to(torch.uint8).numpy())

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.writer.put("image_ids", np.array(self.ids))
            for name, value in self.meta.items():
                self.writer.put(name, value)
        self.writer.__exit__(kind, *rest)


def stored_class_names(data: Any, path: str | os.PathLike) -> list[str]:
    """The ``class_names`` an OOF or probability file carries (an error if it carries none)."""
    if "class_names" not in data.files:
        raise CheckpointError(
            f"{path} carries no class_names (written by an older version): re-create it, so that files "
            "of different class lists are never averaged channel by channel"
        )
    return [str(n) for n in data["class_names"]]


def check_same_classes(named: Sequence[tuple[str, list[str]]]) -> list[str]:
    """The common class list of ``(source, class names)`` pairs; an error naming both lists if two differ."""
    first_source, first = named[0]
    for source, names in named[1:]:
        if names != first:
            raise CheckpointError(
                f"class lists differ: {first_source} has {first}, {source} has {names}; files of other "
                "classes (or another class order) cannot be combined"
            )
    return list(first)


class OofRuns:
    """The OOF files of one or more runs trained on the same folds, checked to belong together.

    Runs whose folds did not all finish are refused (``allow_partial``: used as they are, and ``partial``
    lists what was accepted). Iterating yields, per training image, ``(image_id, fold, [probs of each run],
    target)``; the fold is the number in the fold's ``best.json`` (not a position in a sorted list of folder
    names).
    """

    def __init__(self, runs: Sequence[str | os.PathLike], allow_partial: bool = False):
        if not runs:
            raise ValueError("no runs given")
        self.runs = [Path(r) for r in runs]
        self.infos, self.partial = provenance.complete_runs(self.runs, allow_partial)
        self.tables: list[dict[str, tuple[int, Any]]] = []
        named, ignores = [], []
        for info in self.infos:
            table: dict[str, tuple[int, Any]] = {}
            for d in info.fold_dirs():
                path = d / OOF_FILE
                if not path.is_file():
                    raise CheckpointError(f"no out-of-fold predictions {path} (train with train.oof=probs)")
                data = np.load(path)
                fold = int(read_best_meta(d)["fold"])
                named.append((str(path), stored_class_names(data, path)))
                ignores.append(
                    (str(path), int(data["ignore_index"].item()) if "ignore_index" in data.files else 255)
                )
                for key in data["image_ids"].tolist():
                    table[str(key)] = (fold, data)
            self.tables.append(table)
        self.class_names = check_same_classes(named)
        self.background = provenance.common_background(self.infos)
        if len({i for _, i in ignores}) > 1:
            raise CheckpointError(f"OOF files use different ignore_index values: {ignores}")
        self.ignore_index = ignores[0][1]
        for run, table in zip(self.runs[1:], self.tables[1:]):
            if set(table) != set(self.tables[0]):
                raise CheckpointError(
                    f"{run} has OOF predictions for other images than {self.runs[0]}: not the same folds?"
                )
        self.folds = sorted({fold for fold, _ in self.tables[0].values()})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.tables[0])

    def __iter__(self) -> Iterator[tuple[str, int, list[np.ndarray], np.ndarray]]:
        for key in self.tables[0]:
            yield key, *self.read(key)

    def read(self, key: str) -> tuple[int, list[np.ndarray], np.ndarray]:
        """``(fold, [probs of each run], target)`` of one image, decompressing only its maps."""
        fold, first = self.tables[0][key]
        probs = [table[key][1][f"pred__{key}"] for table in self.tables]
        if any(p.ndim != 3 for p in probs):
            raise CheckpointError(
                "OOF predictions were saved as argmax (train.oof=argmax); need probabilities"
            )
        if len({p.shape for p in probs}) > 1:
            raise CheckpointError(
                f"OOF maps of image {key} differ in size across runs: {[p.shape for p in probs]}"
            )
        return fold, probs, first[f"target__{key}"]
