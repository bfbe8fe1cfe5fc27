"""Out-of-fold (OOF) files and saved probabilities: written streaming, read back with the checks that files
combined belong together.

``fold<k>/oof.npz`` (``train.oof``): ``pred__<id>`` (float16 ``[C, h, w]`` probabilities or uint8 ``[h, w]``
argmax), ``target__<id>`` (uint8 mask at the same size), ``image_ids`` with, in the same order,
``file_names`` and ``sizes`` (``[N, 2]`` height and width of each validated map), ``class_names``, ``fold``
and ``ignore_index`` and ``provenance`` (run name, config and folds hashes, fold, size). ``predict
--save-probs`` files hold ``pred__<id>``, ``image_ids``, ``file_names``, ``sizes`` (of each image),
``class_names`` and ``provenance`` (``predictions.provenance``).

Files are joined **by image file name**, never by id or position: an id is only a number the file was
written with (``predict --images DIR`` numbers images in sorted-path order, a COCO json in its own), so two
files, or a file and a json, may give one number to different images. Anything that combines such files (OOF
evaluation, weight search, ``competition ensemble``) refuses files whose class lists differ, naming both
lists (same-sized maps of classes in another order would otherwise be averaged channel by channel), and
files that lack an image or hold it at another size, naming the first such image.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checkpoint import CheckpointError, read_best_meta
from ..core.io import NpzStreamWriter, read_ahead, usable_cores
from ..core.metrics import argmax_classes
from ..core.runtime import sample_id
from . import provenance

R = TypeVar("R")

OOF_FILE = "oof.npz"
DTYPE_KEY = "probs_dtype"  # how an OOF file stores probabilities (absent: float16, the format before it)
# uint8 levels (p x 255) by default: maps 2.4x smaller and 1.6x faster to read than float16, choices the same
# (benchmarks/oof_scale.py, tests/competition/oof/test_oof_format.py); float16 is still written on request
def to_uint8(probs: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` probabilities as uint8 levels ``round(p * 255)``, keeping each pixel's arg-max: where
    rounding ties the top class with another (the arg-max would then pick the lower index), the top class
    gets one level more, so a run's own OOF arg-max (and its mIoU) is exactly that of the float maps."""
    levels = (probs.float() * 255).round_().clamp_(0, 255).to(torch.int16)
    top = probs.argmax(0, keepdim=True)
    tied = levels.argmax(0, keepdim=True) != top
    levels.scatter_add_(0, top, tied.to(torch.int16))
    return levels.clamp_(0, 255).to(torch.uint8).numpy()


QUANTIZERS = {"uint8": to_uint8, "float16": lambda p: p.half().numpy()}
PROBS_DTYPE = "uint8"


class OofWriter:
    """Streams one fold's out-of-fold predictions into an ``.npz`` (module docstring for the keys).

    ``add`` takes probabilities (``runtime.to_probs``) and a batch with ``image_id``, ``file_name`` and
    ``mask``. With ``size`` (``train.oof_size``, 256 by default: the Boostcamp submission size) maps whose
    longer side exceeds it are shrunk, keeping their aspect ratio, so that side is ``size`` (bilinear
    probabilities, nearest targets) to keep files small; a smaller map is kept as it is. OOF scores then need
    no access to the data.
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
        dtype: str = PROBS_DTYPE,
    ):
        if dtype not in QUANTIZERS:
            raise ValueError(f"OOF probabilities are stored as {sorted(QUANTIZERS)}, not {dtype!r}")
        self.writer, self.mode, self.size, self.dtype = NpzStreamWriter(path), mode, size, dtype
        self.ids: list[str] = []
        self.names: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.meta = {"class_names": np.array(list(class_names)), "fold": np.array(fold)}
        self.meta["ignore_index"] = np.array(ignore_index)
        self.meta[DTYPE_KEY] = np.array(dtype)
        block = {"kind": "oof", "fold": fold, "size": size, **(origin or {})}
        self.meta[provenance.KEY] = provenance.to_npz(block)

    def __enter__(self) -> OofWriter:
        self.writer.__enter__()
        return self

    def add(self, batch: dict[str, Any], probs: torch.Tensor) -> None:
        masks = batch["mask"].to(probs.device)
        if "file_name" not in batch:
            raise ValueError("OofWriter.add needs each image's file_name in the batch (the files' join key)")
        shape = shrunk(tuple(probs.shape[-2:]), self.size)
        if shape != tuple(probs.shape[-2:]):
            probs = F.interpolate(probs, size=shape, mode="bilinear", align_corners=False)
            masks = F.interpolate(masks[:, None].float(), size=shape, mode="nearest")[:, 0].long()
        for image_id, name, p, m in zip(batch["image_id"], batch["file_name"], probs.cpu(), masks.cpu()):
            key = sample_id(image_id)
            self.ids.append(key)
            self.names.append(str(name))
            self.sizes.append(tuple(int(v) for v in batch["mask"].shape[-2:]))
            value = QUANTIZERS[self.dtype](p) if self.mode == "probs" else p.argmax(0).to(torch.uint8).numpy()
            self.writer.put(f"pred__{key}", value)
            self.writer.put(f"target__{key}", m.to(torch.uint8).numpy())

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.writer.put("image_ids", np.array(self.ids))
            self.writer.put("file_names", np.array(self.names))
            self.writer.put("sizes", np.array(self.sizes, dtype=np.int64).reshape(-1, 2))
            for name, value in self.meta.items():
                self.writer.put(name, value)
        self.writer.__exit__(kind, *rest)


def opened(runs: Any, allow_partial: bool = False) -> OofRuns:
    """``runs`` as an opened ``OofRuns``: an ``OofRuns`` as it is (a command opens the files once and hands
    them to every tool), run folders opened now."""
    return runs if isinstance(runs, OofRuns) else OofRuns(runs, allow_partial)


def decode_probs(stored: np.ndarray) -> np.ndarray:
    """Probabilities of a stored OOF map: ``uint8`` levels ``round(p * 255)`` as float32 ``p`` (to 1/510), or
    a ``float16`` map (files written before quantisation) as it is."""
    if stored.dtype == np.uint8 and stored.ndim == 3:
        return from_levels(stored)
    return stored


def from_levels(levels: np.ndarray) -> np.ndarray:
    """Stored uint8 levels (any shape) as float32 probabilities, as ``decode_probs`` reads a map."""
    return levels.astype(np.float32) * np.float32(1 / 255)


class ImageMaps(Sequence[np.ndarray]):
    """One image's stored maps of every run, as ``OofRuns`` reads them: ``maps[r]`` is run ``r``'s
    probabilities (``decode_probs``; the first index decodes every run's map, which are then kept),
    ``labels()`` every run's arg-max class map taken on the stored levels, so a pass that needs only the
    classes never decodes a map. Made and used on one reading thread."""

    def __init__(self, stored: list[np.ndarray]):
        self.stored = stored
        self.decoded: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if self.decoded is None:  # all at once: decoding between other work churns the allocator (2.8x)
            self.decoded = [decode_probs(s) for s in self.stored]
        return self.decoded[index]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[r] for r in range(len(self)))

    def labels(self) -> list[np.ndarray]:
        """Each run's class map (``argmax(0)`` of its probabilities; uint8 levels give the same classes)."""
        return [argmax_classes(s) for s in self.stored]

    def pixels(self, index: np.ndarray) -> list[np.ndarray]:
        """Each run's stored values ``[C, n]`` (uint8 levels, or float16) at the flat pixel indices ``index``:
        only those are decoded later (``from_levels`` gives the numbers the decoded maps have there)."""
        return [s.reshape(len(s), -1)[:, index] for s in self.stored]


def shrunk(shape: tuple[int, int], size: int | None) -> tuple[int, int]:
    """``(height, width)`` with the longer side at most ``size``, aspect ratio kept (``None``: as it is)."""
    if size is None or max(shape) <= size:
        return shape
    scale = size / max(shape)
    return tuple(max(1, round(side * scale)) for side in shape)


def stored_images(data: Any, path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, int]]]:
    """``file name -> (key, (height, width))`` of an OOF or probability file: the join key of its maps
    (``pred__<key>``). A file without names (an older version's) or naming an image twice is refused."""
    if "file_names" not in data.files:
        raise CheckpointError(
            f"{path} records no image file names (written by an older version): re-create it (predict "
            "--save-probs, or train --resume of the run with train.oof), so that maps are joined by image, "
            "not by an id that may number other images elsewhere"
        )
    keys, names = [str(k) for k in data["image_ids"]], [str(n) for n in data["file_names"]]
    sizes = [tuple(int(v) for v in s) for s in data["sizes"]] if "sizes" in data.files else [None] * len(keys)
    out: dict[str, tuple[str, tuple[int, int]]] = {}
    for key, name, size in zip(keys, names, sizes):
        if name in out:
            raise CheckpointError(f"{path} holds image {name} twice (ids {out[name][0]} and {key})")
        out[name] = (key, size)
    return out


def join_images(
    wanted: Sequence[tuple[str, tuple[int, int] | None]],
    held: dict[str, tuple[str, tuple[int, int] | None]],
    path: str | os.PathLike,
    what: str,
) -> list[str]:
    """The keys in ``held`` (``stored_images``) of every ``(file name, size)`` in ``wanted``, in its order;
    an image missing from ``path``, or held at another size, is an error naming the first such image."""
    keys = []
    for name, size in wanted:
        if name not in held:
            close = difflib.get_close_matches(name, list(held), n=1)
            hint = f" (it has {close[0]!r})" if close else ""
            raise CheckpointError(f"{path} has no map of image {name!r}, which {what} lists{hint}")
        key, have = held[name]
        if size is not None and have is not None and tuple(size) != tuple(have):
            raise CheckpointError(
                f"{path} holds image {name!r} at {have[0]}x{have[1]}, but {what} gives it as "
                f"{size[0]}x{size[1]}: another image of the same name?"
            )
        keys.append(key)
    return keys


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
    target)``; ``image_id`` is the first run's id of the image (``file_names`` maps it to the image's file
    name), the fold is the number in the fold's ``best.json``. Runs are joined by file name: every run must
    hold every image of the first run, at the same size and in the same fold, and no other.
    """

    def __init__(
        self, runs: Sequence[str | os.PathLike], allow_partial: bool = False, workers: int | None = None
    ):
        if not runs:
            raise ValueError("no runs given")
        self.workers = usable_cores() if workers is None else workers  # threads reading ahead (read_ahead)
        self.runs = [Path(r) for r in runs]
        self.infos, self.partial = provenance.complete_runs(self.runs, allow_partial)
        # per run: file name -> (fold, opened file, key in that file, size)
        self.tables: list[dict[str, tuple[int, Any, str, Any]]] = []
        named, ignores = [], []
        for info in self.infos:
            table: dict[str, tuple[int, Any, str, Any]] = {}
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
                for name, (key, size) in stored_images(data, path).items():
                    if name in table:
                        raise CheckpointError(
                            f"image {name!r} is out-of-fold in two folds of {info.dir} ({table[name][0]} and "
                            f"{fold}): the folds did not train on one folds file"
                        )
                    table[name] = (fold, data, key, size)
            self.tables.append(table)
        self.class_names = check_same_classes(named)
        self.background = provenance.common_background(self.infos)
        if len({i for _, i in ignores}) > 1:
            raise CheckpointError(f"OOF files use different ignore_index values: {ignores}")
        self.ignore_index = ignores[0][1]
        for run, table in zip(self.runs[1:], self.tables[1:]):
            self._check_same_images(run, table)
        self.file_names = {key: name for name, (_, _, key, _) in self.tables[0].items()}
        self.folds = sorted({fold for fold, *_ in self.tables[0].values()})

    def _check_same_images(self, run: Path, table: dict[str, tuple[int, Any, str, Any]]) -> None:
        """Every image of the first run, and no other, in ``run`` at the same size and fold (named)."""
        first = self.tables[0]
        extra = sorted(set(table) - set(first))
        if extra:
            raise CheckpointError(
                f"{run} has OOF predictions of images {self.runs[0]} has none of (first: {extra[0]!r}): not "
                "the same folds?"
            )
        for name, (fold, _, _, size) in first.items():
            if name not in table:
                raise CheckpointError(
                    f"{run} has no OOF prediction of image {name!r}, which {self.runs[0]} has: not the same "
                    "folds?"
                )
            other_fold, _, _, other_size = table[name]
            if other_fold != fold:
                raise CheckpointError(
                    f"image {name!r} is in fold {fold} of {self.runs[0]} but in fold {other_fold} of {run}: "
                    "runs trained on other folds files cannot be combined out-of-fold"
                )
            if None not in (size, other_size) and tuple(size) != tuple(other_size):
                raise CheckpointError(
                    f"image {name!r} was validated at {size} in {self.runs[0]} but at {other_size} in {run}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.tables[0])

    def __iter__(self) -> Iterator[tuple[str, int, ImageMaps, np.ndarray]]:
        """Every image ``(key, fold, probs, target)`` in one order, its maps read ahead on ``workers`` threads
        (the same items, in the same order, as one thread reads them)."""
        return self.map(lambda *image: image)

    def map(self, measure: Callable[[str, int, ImageMaps, np.ndarray], R]) -> Iterator[R]:
        """``measure(key, fold, probs, target)`` of every image, in the order of ``__iter__``, computed on the
        threads that read the maps (``measure`` must only read shared state): the per-image work of a pass
        runs on every core, not only the decompression."""
        return read_ahead(lambda key: measure(key, *self.read(key)), list(self.file_names), self.workers)

    def feed(self, *consumers: Any) -> None:
        """One pass for several consumers, each with ``measure(key, fold, probs, target) -> part`` (pure, run
        on the reading threads) and ``merge(part)`` (run here, image by image in order, so the merged counts
        are those of one thread)."""
        for parts in self.map(lambda *image: [c.measure(*image) for c in consumers]):
            for consumer, part in zip(consumers, parts):
                consumer.merge(part)

    def check_files(self, files: dict[str, str], source: str) -> None:
        """Refuse when ``files`` (image id -> file name, e.g. ``data.splits.data_files``) names another file
        than the OOF files do for any image id, or lacks one (the first such image is named)."""
        for key, name in self.file_names.items():
            if files.get(key) != name:
                raise CheckpointError(
                    f"OOF image {key} is {name!r}, but {source} gives {files.get(key)!r} for id {key}: the "
                    "annotations changed since the runs trained?"
                )

    def read(self, key: str) -> tuple[int, ImageMaps, np.ndarray]:
        """``(fold, probs of each run, target)`` of one image (the first run's ``key``), decompressing only
        its maps (``ImageMaps``: decoded to floats only where a run's probabilities are asked for)."""
        name = self.file_names[key]
        fold, first, _, _ = self.tables[0][name]
        stored = [data[f"pred__{k}"] for _, data, k, _ in (table[name] for table in self.tables)]
        if any(p.ndim != 3 for p in stored):
            raise CheckpointError(
                "OOF predictions were saved as argmax (train.oof=argmax); need probabilities"
            )
        if len({p.shape for p in stored}) > 1:
            raise CheckpointError(
                f"OOF maps of image {name!r} differ in size across runs: {[p.shape for p in stored]}"
            )
        return fold, ImageMaps(stored), first[f"target__{key}"]
