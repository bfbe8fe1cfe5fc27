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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .io import atomic_dir, file_hash
from .runtime import check_weights

__all__ = ["export_bundle", "read_bundle", "Bundle", "BundleError", "OnnxModel", "ONNX_FILE"]

FORMAT = "smp_unet3p-bundle/1"
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
FOLD_FILES = ("config.yaml", "best.safetensors", "best.json", "metrics.csv")
STRIDE_KEY = "output_stride"  # ONNX metadata: the eager encoder's output stride (inputs are padded to it)
ONNX_TOLERANCE = 1e-4  # max |logit difference| between onnxruntime and eager, relative to the largest |logit|


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


class OnnxModel(nn.Module):
    """A fold's ``model.onnx`` run by onnxruntime (CPU), returning the logits as the eager model would."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError(
                "--engine onnxruntime needs onnxruntime: pip install \"smp-unet3p[infer]\""
            ) from exc
        if not Path(path).is_file():
            raise BundleError(f"{path} not found: export the bundle with --onnx to predict with onnxruntime")
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        stride = self.session.get_modelmeta().custom_metadata_map.get(STRIDE_KEY)
        # what input sides must divide by, recorded at export (None: a graph exported before it was)
        self.output_stride = int(stride) if stride else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: x.detach().float().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)


def _set_metadata(path: Path, values: dict[str, str]) -> None:
    """Add ``values`` to an ONNX file's metadata (read back by ``OnnxModel``)."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError('export --onnx needs onnx: pip install "smp-unet3p[infer]"') from exc
    graph = onnx.load(str(path))
    for key, value in values.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def export_onnx(fold_dir: Path, target: Path) -> float:
    """Export a fold's best weights to ``target`` (dynamic batch, height and width) and check onnxruntime
    against eager on a random input of another size than the export's; returns the max logit difference
    relative to the largest logit."""
    from .checkpoint import load_fold_model
    from .runtime import main_logits, output_stride, padded_size

    model, cfg, _ = load_fold_model(fold_dir, "cpu")
    stride = output_stride(model)
    height, width = padded_size(cfg.augment.hw(cfg.augment.eval_size) or (256, 256), stride)
    sample = torch.rand(1, cfg.model.in_channels, height, width)  # the eval size padded to the stride
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on smp's shape checks: the export is checked against eager below instead
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model, (sample,), str(target), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": axes, "logits": axes}, opset_version=17, dynamo=False,
        )  # fmt: skip
        check = torch.rand(2, cfg.model.in_channels, height + stride, width + 2 * stride)
        _set_metadata(target, {STRIDE_KEY: str(stride)})
        eager = main_logits(model(check))
    onnx_out = OnnxModel(target)(check)
    difference = float((onnx_out - eager).abs().max() / eager.abs().max().clamp(min=1.0))
    if not difference <= ONNX_TOLERANCE:
        raise BundleError(
            f"{fold_dir}: the ONNX export differs from the eager model by {difference:.2e} of the largest "
            f"logit (tolerance {ONNX_TOLERANCE}); export without --onnx and predict with --engine torch"
        )
    return difference


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
    from .postprocess import PostProcess
    from .provenance import common_background, complete_runs
    from .runtime import normalize_weights

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
