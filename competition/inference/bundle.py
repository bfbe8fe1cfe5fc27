"""An offline inference bundle: what ``predict`` needs from some runs, in one folder, with hashes.

``competition export --runs RUN... --out BUNDLE`` copies per fold ``config.yaml``, ``best.safetensors``,
``best.json`` and ``metrics.csv`` (which says the fold finished; ``last.ckpt``, the optimizer state, is left
behind), optionally a ``model.onnx`` per fold (dynamic batch and size, checked against the eager model on a
sample input before it is kept), the ensemble weights and a ``postprocess.json``, a ``requirements.txt`` of
the exact installed versions, and ``manifest.json`` (format, runs with their provenance and weights, and a
hash of every file). ``competition predict --bundle BUNDLE [--engine torch|onnxruntime]`` checks every hash
first (a changed or missing file is refused, named) and predicts as from the runs. The folder is written to a
temp folder and renamed, so an interrupted export leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import atomic_dir, file_hash
from ..core.runtime import check_weights
from .onnx import ONNX_FILE, export_onnx

__all__ = ["export_bundle", "read_bundle", "Bundle", "BundleError"]

FORMAT = "smp_unet3p-bundle/1"
MANIFEST = "manifest.json"
FOLD_FILES = ("config.yaml", "best.safetensors", "best.json", "metrics.csv")


class BundleError(ValueError):
    """A bundle that cannot be made or used as it is; the message names the file at fault."""


def requirements() -> list[str]:
    """``name==version`` of this package's installed requirements (and of onnxruntime when installed)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        wanted = [r for r in requires("smp-unet3p") or [] if "extra ==" not in r]
    except PackageNotFoundError:  # a source tree that is not installed
        wanted = ["torch", "segmentation-models-pytorch", "timm", "albumentations"]
    names = [re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0] for r in wanted] + ["onnxruntime"]
    pinned = []
    for name in dict.fromkeys(names):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pinned


def export_bundle(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    postprocess: str | os.PathLike | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Write the bundle of ``runs`` to ``out``; returns the manifest. Runs whose folds did not all finish are
    refused unless ``allow_partial`` (the manifest records the problems, as predict's provenance does)."""
    from ..core.runtime import normalize_weights
    from ..predictions.postprocess import PostProcess
    from ..predictions.provenance import common_background, complete_runs

    infos, partial = complete_runs(runs, allow_partial)
    names = [info.name for info in infos]
    if len(set(names)) < len(names):
        raise BundleError(f"runs with the same name cannot share a bundle: {names}")
    run_weights = normalize_weights(weights, len(runs)).tolist()
    classes = infos[0].class_names
    if any(info.class_names != classes for info in infos):  # as predict checks
        raise BundleError(f"runs predict different classes: {[(i.name, i.class_names) for i in infos]}")
    if postprocess is not None:
        PostProcess.load(postprocess, classes, common_background(infos))  # as predict will read it
    with atomic_dir(out, overwrite) as tmp:
        entries, checks = [], {}
        for info, weight in zip(infos, run_weights):
            for fold_dir in info.fold_dirs():
                dest = tmp / "runs" / info.name / fold_dir.name
                dest.mkdir(parents=True)
                for name in FOLD_FILES:
                    shutil.copy2(fold_dir / name, dest / name)
                if onnx:
                    checks[f"{info.name}/{fold_dir.name}"] = export_onnx(dest, dest / ONNX_FILE)
            entry = {"name": info.name, "dir": f"runs/{info.name}", "weight": weight}
            entries.append(entry | {"provenance": info.record()})
        if postprocess is not None:
            shutil.copy2(postprocess, tmp / "postprocess.json")
        (tmp / "requirements.txt").write_text("\n".join(requirements()) + "\n")
        files = {p.relative_to(tmp).as_posix(): file_hash(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "classes": classes,
            "runs": entries,
            "postprocess": "postprocess.json" if postprocess is not None else None,
            "onnx": onnx,
            "onnx_max_difference": checks,
            "partial": partial,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class Bundle:
    """A checked bundle: its run folders, their weights, its post-processing file and whether it has ONNX."""

    dir: Path
    runs: list[Path]
    weights: list[float]
    postprocess: Path | None
    onnx: bool


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read ``manifest.json`` and check every file it lists against its hash."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not a bundle (no readable {MANIFEST}: {exc})") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file} is missing from the bundle")
        if file_hash(file) != digest:
            raise BundleError(f"{file} differs from the file the bundle was made with (hash mismatch)")
    extra = sorted(
        p.relative_to(path).as_posix() for p in (path / "runs").rglob("*") if p.is_file()
    )  # a fold folder added by hand (fold0_old, a retrained fold) would be read as a fold of the run
    extra = [name for name in extra if name not in manifest["files"]]
    if extra:
        raise BundleError(
            f"{path / extra[0]} is not part of the bundle ({len(extra)} file(s) under runs/ that {MANIFEST} "
            "does not list): remove them, or export the bundle again"
        )
    post = manifest.get("postprocess")
    weights = check_weights([run["weight"] for run in manifest["runs"]], str(path / MANIFEST))
    return Bundle(
        path,
        [path / run["dir"] for run in manifest["runs"]],
        weights.tolist(),
        path / post if post else None,
        bool(manifest.get("onnx")),
    )


def bundle_size(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path`` (a bundle or a run folder)."""
    return int(np.sum([p.stat().st_size for p in Path(path).rglob("*") if p.is_file()]))
