"""Submission CSVs and their validator.

- ``boostcamp`` (default): columns ``image_id,PredictionString``; ``image_id`` is the test image's
  ``file_name``, ``PredictionString`` the class ids of the mask resized (nearest) to ``size x size``,
  flattened row-major and space-separated; rows in the order of the test json.
- ``rle``: columns ``image_id,class_id,EncodedPixels``, one row per (image, class present) except the
  background class (class 0; with ``data.background: none`` every class is written, 0 included): Kaggle
  run-length pairs ``start length`` with 1-based starts over the row-major flattened mask.

Masks come from probabilities by one route (``mask_from_probs``): probabilities are resized to the submission
size, rounded to float16 (the precision of saved probabilities) and then reduced by argmax. ``predict`` and
``competition ensemble`` of the same probabilities therefore write the same CSV.

The writer checks its own output with ``validate_submission`` before the atomic rename, so a broken file
is never left in place of a good one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..core.io import atomic_write

FORMATS = ("boostcamp", "rle")
Size = int | tuple[int, int] | None  # a square side, (height, width), or None: as it is (native)
COLUMNS = {"boostcamp": ["image_id", "PredictionString"], "rle": ["image_id", "class_id", "EncodedPixels"]}


class SubmissionError(ValueError):
    """A submission file breaks the format; the message lists the first problems."""


def shape_of(size: Size) -> tuple[int, int] | None:
    """``(height, width)`` of a ``Size`` (``None`` stays ``None``)."""
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_probs(probs: torch.Tensor | np.ndarray, size: Size) -> torch.Tensor:
    """``[C, H, W]`` probabilities as float32, resized (bilinear) to ``size``; ``None`` keeps them."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    shape = shape_of(size)
    if shape is None or tuple(p.shape[-2:]) == shape:
        return p
    return F.interpolate(p[None], size=shape, mode="bilinear", align_corners=False)[0]


def mask_from_probs(probs: torch.Tensor | np.ndarray, size: Size) -> np.ndarray:
    """Class-index mask (uint8 at ``size``; ``None``: as the probabilities are) of ``[C, H, W]``
    probabilities: resize the probabilities (bilinear), round them to float16, then take the argmax. Never
    resize labels."""
    return resize_probs(probs, size).half().argmax(0).to(torch.uint8).numpy()


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """Nearest-neighbour resize of a class-index mask to ``size`` (``None``: unchanged)."""
    shape = shape_of(size)
    if shape is None or mask.shape == shape:
        return mask
    return cv2.resize(mask.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST)


def rle_encode(binary: np.ndarray) -> str:
    """Run-length encoding (1-based ``start length`` pairs, row-major) of a binary mask."""
    flat = np.concatenate([[0], binary.reshape(-1).astype(np.uint8), [0]])
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    changes[1::2] -= changes[::2]
    return " ".join(map(str, changes))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of ``rle_encode``; raises ``ValueError`` on odd, unsorted or out-of-bounds runs."""
    values = (
        np.array(rle.split(), dtype=np.int64)
        if isinstance(rle, str) and rle.strip()
        else np.zeros(0, np.int64)
    )
    if len(values) % 2:
        raise ValueError("odd number of values in run-length string")
    starts, lengths = values[0::2] - 1, values[1::2]
    size = shape[0] * shape[1]
    if (starts < 0).any() or (lengths <= 0).any() or (starts + lengths > size).any():
        raise ValueError(f"run outside the {shape[0]}x{shape[1]} mask or of non-positive length")
    if (starts[1:] < starts[:-1] + lengths[:-1]).any():
        raise ValueError("runs overlap or are not sorted")
    flat = np.zeros(size, np.uint8)
    for s, n in zip(starts, lengths):
        flat[s : s + n] = 1
    return flat.reshape(shape)


def submission_rows(
    file_name: str, mask: np.ndarray, fmt: str = "boostcamp", size: Size = 256, background: int | None = 0
) -> list[list]:
    """The CSV rows of one image's class-index mask (``rle``: no row for ``background``)."""
    mask = resize_mask(mask, size)
    if fmt == "boostcamp":
        return [[file_name, " ".join(map(str, mask.reshape(-1).tolist()))]]
    return [[file_name, int(c), rle_encode(mask == c)] for c in np.unique(mask) if c != background]


def write_submission(
    rows: Iterable[list],
    path: str | os.PathLike,
    expected_ids: Sequence[str],
    classes: int,
    fmt: str = "boostcamp",
    size: int | None = 256,
    overwrite: bool = False,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    background: int | None = 0,
) -> Path:
    """Write rows atomically after validating them; an invalid result raises and leaves nothing behind.
    ``size=None`` (native): ``shapes`` gives each image's ``(height, width)``."""
    frame = pd.DataFrame(list(rows), columns=COLUMNS[fmt])

    def write(tmp: Path) -> None:
        frame.to_csv(tmp, index=False)
        problems = validate_submission(
            tmp, expected_ids, classes, fmt, size, shapes=shapes, background=background
        )
        if problems:
            raise SubmissionError(f"refusing to write {path}: " + "; ".join(problems[:5]))

    return atomic_write(path, write, overwrite)


def validate_submission(
    path: str | os.PathLike,
    expected_ids: Sequence[str],
    classes: int,
    fmt: str = "boostcamp",
    size: int | None = 256,
    max_problems: int = 20,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    background: int | None = 0,
) -> list[str]:
    """Every problem found (empty list = valid): columns, row count and order, ids, values, blanks.

    ``size``: the side of every mask; ``None``: native size, each image's ``(height, width)`` from ``shapes``
    (file name -> shape, from the test json). ``background``: the class ``rle`` rows never name (``None``:
    every class may have rows)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown submission format {fmt!r}; choose from {FORMATS}")
    if size is None and shapes is None:
        raise ValueError(
            "a native-size submission (size 0) is checked against each image's size: pass shapes"
        )

    def shape(image_id: str) -> tuple[int, int] | None:
        return shape_of(size) if size is not None else (shapes or {}).get(image_id)

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        return [f"{path} is not a readable CSV: {exc}"]
    problems: list[str] = []
    if list(frame.columns) != COLUMNS[fmt]:
        return [f"columns are {list(frame.columns)}, expected {COLUMNS[fmt]}"]
    ids = frame["image_id"].tolist()
    if fmt == "boostcamp":
        if len(frame) != len(expected_ids):
            problems.append(f"{len(frame)} rows, expected {len(expected_ids)} (one per test image)")
        for row, (got, want) in enumerate(zip(ids, expected_ids), start=2):
            if got != want:
                problems.append(f"line {row}: image_id {got!r}, expected {want!r} (test.json order)")
                break
        for row, (image_id, text) in enumerate(zip(ids, frame["PredictionString"]), start=2):
            hw = shape(image_id)
            problems += _check_prediction_string(row, image_id, text, hw and hw[0] * hw[1], classes)
            if len(problems) >= max_problems:
                break
    else:
        unknown = sorted(set(ids) - set(expected_ids))
        if unknown:
            problems.append(f"image ids not in the test set: {unknown[:5]}")
        for row, (image_id, cls, text) in enumerate(
            zip(ids, frame["class_id"], frame["EncodedPixels"]), start=2
        ):
            if not cls.isdigit() or not 0 <= int(cls) < classes:
                problems.append(f"line {row} ({image_id}): class_id {cls!r} not in [0, {classes})")
            elif int(cls) == background:
                problems.append(f"line {row} ({image_id}): class_id {cls} is the background (never written)")
            try:
                hw = shape(image_id)
                if hw is not None:  # an unknown id is reported above
                    rle_decode(text, hw)
            except ValueError as exc:
                problems.append(f"line {row} ({image_id}): {exc}")
            if len(problems) >= max_problems:
                break
        dup = frame.duplicated(["image_id", "class_id"])
        if dup.any():
            problems.append(f"duplicate (image_id, class_id) rows, first at line {int(np.argmax(dup)) + 2}")
    return problems[:max_problems]


def class_pixel_counts(
    path: str | os.PathLike,
    classes: int,
    fmt: str = "boostcamp",
    size: int | None = 256,
    background: int | None = 0,
) -> np.ndarray:
    """Pixels of each class over every mask of a (valid) submission CSV (``rle``: the background's are the
    pixels no row covers)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    counts = np.zeros(classes, np.int64)
    if fmt == "boostcamp":
        for text in frame["PredictionString"]:
            counts += np.bincount(np.array(text.split(), dtype=np.int64), minlength=classes)[:classes]
        return counts
    if not size:
        raise ValueError("class pixel counts of an RLE submission need its mask size")
    for cls, text in zip(frame["class_id"], frame["EncodedPixels"]):
        counts[int(cls)] += int(rle_decode(text, (size, size)).sum())
    if background is not None:
        counts[background] = frame["image_id"].nunique() * size * size - counts.sum()
    return counts


_INTEGERS = re.compile(r"\d+(?: \d+)*")


def _check_prediction_string(row: int, image_id: str, text: str, n: int | None, classes: int) -> list[str]:
    if not image_id.strip():
        return [f"line {row}: blank image_id"]
    if not text.strip():
        return [f"line {row} ({image_id}): blank PredictionString"]
    if not _INTEGERS.fullmatch(text):
        bad = next(v for v in text.split(" ") if not v.isdigit())
        return [f"line {row} ({image_id}): {bad!r} is not a non-negative integer (single spaces between)"]
    count = text.count(" ") + 1
    if n is not None and count != n:
        return [f"line {row} ({image_id}): {count} values, expected {n}"]
    top = int(np.array(text.split(" "), dtype=np.int64).max())
    if top >= classes:
        return [f"line {row} ({image_id}): class {top} >= {classes} classes"]
    return []
