"""Multilabel-stratified (optionally grouped) k-fold on per-image class presence.

Stratification uses iterative-stratification's ``MultilabelStratifiedKFold`` (Sechidis et al., 2011). With
groups, groups are stratified on their aggregated presence and every image of a group lands in the group's
fold, so a group never straddles folds. Groups come from each file's folder (``--group-by-folder``) or from a
CSV ``file_name,group`` (``--groups``): images that must not be split, such as several photos of one scene.
There must be at least as many groups as folds (Boostcamp's three ``batch_*`` folders cannot make 5 folds).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from ..core.io import atomic_write_csv, check_writable
from .classes import ClassMap
from .coco import CocoIndex


def presence_matrix(coco: CocoIndex, class_map: ClassMap) -> pd.DataFrame:
    """One row per image: ``image_id``, ``file_name`` and a 0/1 column per object class name."""
    names, first = class_map.objects, class_map.first_object
    rows = []
    for info in coco.images.values():
        present = np.zeros(len(names), np.int8)
        for ann in coco.annotations[info.id]:
            cls = class_map.category_to_class[ann["category_id"]]
            if cls >= first:
                present[cls - first] = 1
        rows.append({"image_id": info.id, "file_name": info.file_name, **dict(zip(names, present))})
    return pd.DataFrame(rows)


def group_of(file_name: str) -> str:
    """Default group: the file's folder (``batch_01_vt/0002.jpg`` -> ``batch_01_vt``)."""
    parent = os.path.dirname(file_name.replace("\\", "/"))
    return parent or "."


def make_folds(
    presence: np.ndarray, n_splits: int = 5, seed: int = 42, groups: Sequence[str] | None = None
) -> np.ndarray:
    """Fold index per row of a 0/1 presence matrix ``[N, K]`` (deterministic for a seed)."""
    presence = np.asarray(presence)
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if groups is None:
        units, members = presence, np.arange(len(presence))
    else:
        codes, uniques = pd.factorize(pd.Series(list(groups)), sort=True)
        units = np.stack([presence[codes == g].max(axis=0) for g in range(len(uniques))])
        members = codes
    if len(units) < n_splits:
        what = "groups" if groups is not None else "images"
        raise ValueError(f"cannot split {len(units)} {what} into {n_splits} folds")
    unit_fold = np.empty(len(units), np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(units)), units)):
        unit_fold[held_out] = fold
    return unit_fold[members]


def stratification_error(presence: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Per class: max over folds of |fold frequency - overall frequency| (0 = perfect stratification)."""
    presence = np.asarray(presence, float)
    overall = presence.mean(axis=0)
    per_fold = np.stack([presence[folds == f].mean(axis=0) for f in np.unique(folds)])
    return np.abs(per_fold - overall).max(axis=0)


def read_groups(path: str | os.PathLike) -> dict[str, str]:
    """``file_name -> group`` from a CSV with those two columns."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"file_name", "group"} - set(table.columns)
    if missing:
        raise ValueError(f"groups file {path} lacks column(s) {sorted(missing)} (needs file_name,group)")
    duplicated = table.loc[table["file_name"].duplicated(), "file_name"].tolist()
    if duplicated:
        raise ValueError(f"groups file {path} lists file names more than once: {duplicated[:5]}")
    return dict(zip(table["file_name"], table["group"]))


def build_folds(
    coco: CocoIndex,
    class_map: ClassMap,
    n_splits: int = 5,
    seed: int = 42,
    group_by_folder: bool = False,
    groups: Mapping[str, str] | None = None,
    exclude: set[str] | None = None,
) -> pd.DataFrame:
    """Folds table: ``image_id, file_name, fold, group`` plus the presence columns.

    ``group_by_folder`` groups by each file's folder; ``groups`` maps every file name to its group;
    ``exclude``: file names left out (e.g. labels judged wrong after ``competition audit``).
    """
    if group_by_folder and groups is not None:
        raise ValueError("choose one grouping: --group-by-folder or --groups")
    table = presence_matrix(coco, class_map)
    if exclude:
        table = table[~table["file_name"].isin(exclude)].reset_index(drop=True)
    names = list(class_map.objects)
    grouped = group_by_folder or groups is not None
    if groups is not None:
        missing = [f for f in table["file_name"] if f not in groups]
        if missing:
            raise ValueError(f"the groups file has no group for {len(missing)} images: {missing[:5]}")
        table["group"] = [groups[f] for f in table["file_name"]]
    elif group_by_folder:
        table["group"] = [group_of(f) for f in table["file_name"]]
    else:
        table["group"] = table["image_id"].astype(str)
    count = table["group"].nunique()
    if grouped and count < n_splits:
        found = sorted(table["group"].unique())
        raise ValueError(
            f"{count} groups ({', '.join(found[:5])}{' ...' if count > 5 else ''}) cannot make "
            f"{n_splits} folds: "
            f"use --k {count} or fewer, give finer groups with --groups FILE.csv (columns file_name,group), "
            "or split without groups"
        )
    table["fold"] = make_folds(table[names].to_numpy(), n_splits, seed, table["group"] if grouped else None)
    return table[["image_id", "file_name", "fold", "group", *names]]


def write_folds(table: pd.DataFrame, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write the folds CSV atomically; an existing file is kept unless ``overwrite``."""
    atomic_write_csv(path, table, overwrite=overwrite)


def fold_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Images and images-per-class in each fold."""
    class_columns = [c for c in table.columns if c not in ("image_id", "file_name", "fold", "group")]
    summary = table.groupby("fold")[class_columns].sum()
    summary.insert(0, "images", table.groupby("fold").size())
    return summary


def folds_file(
    annotations: str | os.PathLike,
    data_root: str | os.PathLike | None,
    out: str | os.PathLike,
    k: int = 5,
    seed: int = 42,
    group_by_folder: bool = False,
    groups: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
    classes: str | None = None,
    merge_map: str | os.PathLike | None = None,
    no_background: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The ``folds`` stage: a stratified (grouped) k-fold of ``annotations`` written to ``out`` (refused
    before any work when it exists, unless ``overwrite``). Returns the table, the images left out, the
    per-fold summary and the largest per-class deviation of a fold's frequency from the overall one."""
    from .prepare import class_map_of
    from .splits import read_exclude

    check_writable(out, overwrite)
    coco, class_map = class_map_of(annotations, data_root, classes, merge_map, no_background)
    files = [info.file_name for info in coco.images.values()]
    left_out = read_exclude(exclude, files) if exclude else set()
    by_group = read_groups(groups) if groups else None
    table = build_folds(coco, class_map, k, seed, group_by_folder, by_group, left_out or None)
    write_folds(table, out, overwrite=overwrite)
    error = stratification_error(table[list(class_map.objects)].to_numpy(), table["fold"].to_numpy())
    return {"table": table, "excluded": left_out, "summary": fold_summary(table), "error": float(error.max())}
