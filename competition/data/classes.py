"""Class lists: the Boostcamp classes, merge maps (many categories -> few classes) and ``ClassMap``, which
matches COCO categories to class ids by name, never by id."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.config import Config

BOOSTCAMP_CLASSES: tuple[str, ...] = (
    "Background",
    "General trash",
    "Paper",
    "Paper pack",
    "Metal",
    "Glass",
    "Plastic",
    "Styrofoam",
    "Plastic bag",
    "Battery",
    "Clothing",
)
IGNORE_INDEX = 255


class CocoFormatError(ValueError):
    """A COCO file that cannot be used as it is; the message names the file and the item."""


def _norm(name: str) -> str:
    return " ".join(str(name).split()).lower()


def read_merge_map(path: str | os.PathLike) -> dict[str, str]:
    """CSV ``category_name,class_name`` (header optional) -> {category name: class name}."""
    path = Path(path)
    mapping: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise CocoFormatError(f"{path}:{line_no}: expected 'category_name,class_name', got {row}")
            category, cls = row[0].strip(), row[1].strip()
            if line_no == 1 and (_norm(category), _norm(cls)) == ("category_name", "class_name"):
                continue
            if _norm(category) in mapping and mapping[_norm(category)] != cls:
                raise CocoFormatError(f"{path}:{line_no}: category {category!r} mapped twice")
            mapping[_norm(category)] = cls
    if not mapping:
        raise CocoFormatError(f"{path}: merge map is empty")
    return mapping


def default_class_names(merge_map: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The Boostcamp 11 classes, or with a merge map ``Background`` + its classes in order of appearance."""
    if not merge_map:
        return BOOSTCAMP_CLASSES
    return ("Background", *dict.fromkeys(merge_map.values()))


@dataclass(frozen=True)
class ClassMap:
    """Class names (index = class id) and COCO category id -> class id.

    ``background``: class 0 is the background, which unannotated pixels become; without one (CamVid's void,
    data without a background class) every class is a real one and unannotated pixels are ignored (255).
    """

    names: tuple[str, ...]
    category_to_class: Mapping[int, int]
    background: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def first_object(self) -> int:
        """The first class id that is not background: 1, or 0 without a background class."""
        return int(self.background)

    @property
    def objects(self) -> tuple[str, ...]:
        """The classes that are not background (the ones folds stratify on and copy-paste pastes)."""
        return self.names[self.first_object :]

    @property
    def unannotated(self) -> int:
        """The value of pixels no annotation covers: 0 (background) or the ignore index."""
        return 0 if self.background else IGNORE_INDEX

    def key(self) -> str:
        key = [list(self.names), sorted(self.category_to_class.items())]
        return json.dumps(key if self.background else [*key, "no background"])

    @classmethod
    def build(
        cls,
        categories: Mapping[int, str],
        class_names: Sequence[str] | None = None,
        merge_map: Mapping[str, str] | None = None,
        source: str = "annotations",
        background: bool = True,
    ) -> ClassMap:
        """Match categories to classes by name (case/space-insensitive), never by id.

        ``class_names`` defaults to the Boostcamp 11 classes, or with a merge map to ``Background`` plus the
        map's class names in order of first appearance. ``background=False``: no class is background.
        """
        merge = {_norm(k): v for k, v in (merge_map or {}).items()}
        names = tuple(class_names) if class_names is not None else default_class_names(merge_map)
        index = {_norm(n): i for i, n in enumerate(names)}
        if len(index) != len(names):
            raise CocoFormatError(f"class names are not unique: {list(names)}")
        mapping, unmapped = {}, []
        for cat_id, cat_name in categories.items():
            target = merge.get(_norm(cat_name), cat_name)
            if _norm(target) not in index:
                unmapped.append(
                    f"{cat_name!r} (id {cat_id})" + (f" -> {target!r}" if target != cat_name else "")
                )
                continue
            mapping[cat_id] = index[_norm(target)]
        if unmapped:
            raise CocoFormatError(
                f"{source}: {len(unmapped)} categories match no class: {', '.join(unmapped[:10])}"
                + (" ..." if len(unmapped) > 10 else "")
                + f". Classes: {list(names)}. Add them to the class list or to a merge map (--merge-map)."
            )
        return cls(names, mapping, background)


def class_names(cfg: Config) -> list[str]:
    """Class names of the run (index = class id, 0 = background)."""
    data = cfg.data
    if data.classes is not None:
        return list(data.classes)
    if data.format == "folder":
        return ["background", "foreground"]
    return list(default_class_names(read_merge_map(data.merge_map) if data.merge_map else None))
