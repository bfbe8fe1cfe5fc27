"""The training and validation data of one fold: a folds CSV, checked against the data it was made from.

A folds CSV (written by ``competition folds``) has ``image_id``, ``file_name`` and ``fold`` columns. An image
whose ``fold`` is ``train`` (or ``-1``) is train-only: every fold trains on it and none validates on it, so a
standard train / val split is one complete fold (val = fold 0, train = ``train``). COCO
image ids are local to one json, so the ``file_name`` of every row must be the file name the annotations give
that id: a folds file made from another json is refused instead of silently training on other images. For
folder data ``image_id`` is the file stem, read as text (``"001"`` stays ``"001"``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import Dataset

from smp_unet3p._names import did_you_mean

from ..core.config import Config, ConfigError
from ..core.runtime import Dist
from .classes import ClassMap, class_names
from .transforms import build_eval_transform, build_train_transform


class FoldsMismatchError(ConfigError):
    """A folds file does not belong to the annotations (or image folder) it is used with."""


TRAIN_ONLY = -1  # the fold of a train-only image (written "train" or -1 in a folds CSV)


def read_folds_table(path: str | os.PathLike) -> pd.DataFrame:
    """A folds CSV with ``image_id`` (text) and integer ``fold`` columns (``train`` read as ``TRAIN_ONLY``),
    checked for duplicates."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"folds file {path} not found (data.folds); make it with `competition folds`")
    table = pd.read_csv(path, dtype={"image_id": str, "file_name": str, "fold": str})
    missing = {"image_id", "fold"} - set(table.columns)
    if missing:
        raise ConfigError(f"folds file {path} lacks column(s) {sorted(missing)}")
    text = table["fold"].fillna("").str.strip().replace({"train": str(TRAIN_ONLY)})
    bad = sorted({v for v in text if not (v.isdigit() or v == str(TRAIN_ONLY))})
    if bad:
        raise ConfigError(
            f"folds file {path}: column 'fold' must hold fold numbers (0, 1, ...) or 'train' (train-only "
            f"images), got {bad[:5]}"
        )
    table["fold"] = text.astype(int)
    duplicated = table.loc[table["image_id"].duplicated(), "image_id"].tolist()
    if duplicated:
        raise ConfigError(f"folds file {path} lists image ids more than once: {duplicated[:5]}")
    return table


def validation_folds(table: pd.DataFrame) -> list[int]:
    """The folds of a folds table that validate (every fold number but ``TRAIN_ONLY``)."""
    return sorted(int(f) for f in table["fold"].unique() if f != TRAIN_ONLY)


def parse_folds(spec: str, folds_file: str | os.PathLike) -> list[int]:
    """``"all"`` (every validation fold of the folds file) or comma-separated fold numbers of it."""
    known = validation_folds(read_folds_table(folds_file))
    if spec == "all":
        return known
    parts = [p.strip() for p in spec.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"--fold must be 'all' or fold numbers like 0,2; got {spec!r}")
    unknown = [int(p) for p in parts if int(p) not in known]
    if unknown:
        raise ConfigError(f"--fold {spec}: {unknown} not among the folds {known} of {folds_file}")
    return [int(p) for p in parts]


def check_file_names(table: pd.DataFrame, actual: dict[str, str], path: Path, source: str) -> None:
    """Every ``image_id`` of ``table`` must be in ``actual`` (id -> file name) with the same ``file_name``."""
    unknown = [i for i in table["image_id"] if i not in actual]
    if unknown:
        raise FoldsMismatchError(
            f"folds file {path} names {len(unknown)} image ids that {source} does not have "
            f"({unknown[:5]}): it was made for other data; remake it with `competition folds`"
        )
    if "file_name" not in table.columns:
        return
    wrong = [
        f"{i}: {listed!r} vs {actual[i]!r}"
        for i, listed in zip(table["image_id"], table["file_name"])
        if listed != actual[i]
    ]
    if wrong:
        raise FoldsMismatchError(
            f"folds file {path} does not belong to {source}: {len(wrong)} image ids name other files "
            f"(folds file vs data: {wrong[:3]}). COCO ids are local to one json; remake the folds file "
            "with `competition folds` on these annotations"
        )


def read_folds(cfg: Config, fold: int, actual: dict[str, str], source: str) -> tuple[list[str], list[str]]:
    """Train ids and validation ids (text) of ``fold``, after checking the file against the data."""
    path = Path(cfg.data.folds)
    table = read_folds_table(path)
    if cfg.data.format == "coco" and "file_name" not in table.columns:
        raise FoldsMismatchError(
            f"folds file {path} has no file_name column: it is what ties each COCO image_id to its image "
            "(ids are local to one json). Make the file with `competition folds` or add the column"
        )
    check_file_names(table, actual, path, source)
    folds = validation_folds(table)
    if fold not in folds:
        raise ConfigError(f"fold {fold} not in {path} (folds: {folds})")
    val = table["fold"] == fold
    if val.all():
        raise ConfigError(
            f"fold {fold} of {path} leaves no training images: every image is in it (folds: {folds})"
        )
    return table.loc[~val, "image_id"].tolist(), table.loc[val, "image_id"].tolist()


def data_files(cfg: Config) -> tuple[dict[str, str], Path]:
    """``image_id -> file name`` of the configured data (COCO ids or folder stems, as text) and the folder
    the file names are relative to."""
    if cfg.data.format == "folder":
        from .datasets import MaskFolderDataset

        every = MaskFolderDataset(cfg.data.image_dir, cfg.data.mask_dir)
        return {stem: path.name for stem, path in every.images.items()}, Path(cfg.data.image_dir)
    from .coco import load_coco

    coco = load_coco(cfg.data.annotations, cfg.data.root)
    return {str(i): info.file_name for i, info in coco.images.items()}, Path(cfg.data.root)


def read_exclude(path: str | os.PathLike, known: Iterable[str]) -> set[str]:
    """File names to leave out (a CSV with a ``file_name`` column, such as ``audit.csv`` trimmed to the
    images judged mislabelled, or a text file of one name per line); names not in ``known`` are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exclude list {path} not found")
    if path.suffix.lower() == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "file_name" not in table.columns:
            raise ConfigError(f"exclude list {path} has no file_name column")
        names = set(table["file_name"])
    else:
        lines = (line.strip() for line in path.read_text().splitlines())
        names = {line for line in lines if line and not line.startswith("#")}
    unknown = sorted(names - set(known))
    if unknown:
        raise ConfigError(f"exclude list {path} names {len(unknown)} images not in the data: {unknown[:5]}")
    return names


def build_datasets(cfg: Config, fold: int, dist: Dist | None = None) -> tuple[Dataset, Dataset, list[str]]:
    """Training (augmented) and validation datasets of one fold, and the class names.

    With ``dist`` only rank 0 builds the mask cache while the others wait.
    """
    names = class_names(cfg)
    train_tf, eval_tf = build_train_transform(cfg.augment), build_eval_transform(cfg.augment)
    if cfg.data.format == "folder":
        from .datasets import MaskFolderDataset

        actual, _ = data_files(cfg)
        train_ids, val_ids = read_folds(cfg, fold, actual, str(cfg.data.image_dir))
        labelled = [actual[i] for i in train_ids + val_ids]
        train_ids, val_ids = _without_excluded(cfg, actual, train_ids, val_ids)

        def make(ids: list[Any], tf: Any) -> Dataset:
            return MaskFolderDataset(
                cfg.data.image_dir, cfg.data.mask_dir, tf, cfg.data.mask_values(), ids, len(names),
                cfg.loss.ignore_index,
            )  # fmt: skip

        train = _with_extra(cfg, fold, make(train_ids, train_tf), names, labelled, train_tf)
        return train, make(val_ids, eval_tf), names

    from .classes import read_merge_map
    from .coco import MaskCache, load_coco
    from .copy_paste import CopyPaste
    from .datasets import CocoSegmentationDataset

    coco = load_coco(cfg.data.annotations, cfg.data.root)
    actual = {str(i): info.file_name for i, info in coco.images.items()}
    train_ids, val_ids = read_folds(cfg, fold, actual, str(cfg.data.annotations))
    labelled = [actual[i] for i in train_ids + val_ids]
    train_ids, val_ids = _without_excluded(cfg, actual, train_ids, val_ids)
    merge = read_merge_map(cfg.data.merge_map) if cfg.data.merge_map else None
    class_map = ClassMap.build(
        coco.categories, names, merge, str(cfg.data.annotations), cfg.data.background_index() is not None
    )
    pasted = paste_classes(cfg.augment.copy_paste_classes, class_map) if cfg.augment.copy_paste else None
    cache = MaskCache(coco, class_map, cfg.data.cache_dir or cfg.data.root / ".mask_cache", cfg.data.crowd)
    if dist is None or dist.main:
        cache.build(progress=cfg.train.progress)
    if dist is not None:
        dist.barrier()
    train_ints = [int(i) for i in train_ids]
    paste = None
    if cfg.augment.copy_paste:
        aug = cfg.augment
        paste = CopyPaste(
            coco, class_map.category_to_class, cfg.data.root, train_ints, aug.copy_paste,
            aug.copy_paste_objects, aug.copy_paste_scale, aug.copy_paste_balanced, cache.mask_path,
            class_map.first_object, pasted,
        )  # fmt: skip
    train = CocoSegmentationDataset(cache, cfg.data.root, train_ints, train_tf, paste)
    return (
        _with_extra(cfg, fold, train, names, labelled, train_tf),
        CocoSegmentationDataset(cache, cfg.data.root, [int(i) for i in val_ids], eval_tf),
        names,
    )


def paste_classes(wanted: list[str] | None, class_map: ClassMap) -> set[int] | None:
    """Class ids of ``augment.copy_paste_classes`` (``None``: every class); an unknown name, or the
    background (never an instance), is an error naming the key."""
    if wanted is None:
        return None
    for name in wanted:
        if name not in class_map.objects:
            raise ConfigError(
                f"augment.copy_paste_classes: {name!r} is not an object class of this run."
                f"{did_you_mean(name, class_map.objects)} Object classes: {list(class_map.objects)}"
            )
    return {class_map.names.index(name) for name in wanted}


def _with_extra(
    cfg: Config, fold: int, train: Dataset, names: list[str], labelled: list[str], tf: Any
) -> Dataset:
    """``data.extra``: pseudo-labelled sets appended to fold ``fold``'s training split, checked against the
    run's folds file and the file names ``labelled`` (every image of the folds file, validation and excluded
    ones included)."""
    if not cfg.data.extra:
        return train
    from ..core.io import file_hash
    from .coco import safe_join
    from .pseudo_labels import with_extra

    base = Path(cfg.data.image_dir if cfg.data.format == "folder" else cfg.data.root)
    files = [safe_join(base, n) for n in labelled]
    folds_hash = file_hash(cfg.data.folds)
    return with_extra(train, cfg.data.extra, names, files, tf, fold, folds_hash, cfg.data.extra_pooled)


def _without_excluded(
    cfg: Config, actual: dict[str, str], train_ids: list[str], val_ids: list[str]
) -> tuple[list[str], list[str]]:
    """``data.exclude``: the listed images leave training and validation alike."""
    if cfg.data.exclude is None:
        return train_ids, val_ids
    drop = read_exclude(cfg.data.exclude, actual.values())
    train, val = (
        [i for i in train_ids if actual[i] not in drop],
        [i for i in val_ids if actual[i] not in drop],
    )
    if not train or not val:
        split = "training" if not train else "validation"
        raise ConfigError(
            f"data.exclude {cfg.data.exclude} leaves no {split} images in this fold of {cfg.data.folds}"
        )
    return train, val
