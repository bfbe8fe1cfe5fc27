"""Models that predict probabilities: test-time augmentation, overlap-tile sliding window, fold/run ensembles.

The floor under the ``infer`` (submission) and ``pseudo`` (pseudo-label) stages.

Everything is averaged in probability space (``runtime.to_probs``), never as logits or argmaxes, and
probabilities are resized before the argmax (``submission.mask_from_probs``), never labels. A model trained
with ``augment.eval_size`` predicts at that size, as it was validated, and its probabilities are resized
back. A TTA view is undone exactly (flips and 90-degree rotations are their own inverse permutations; scaled
views are resized back to the input size) before averaging. All views of a batch that share a shape go
through the model in one forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..core import checkpoint as ckpt
from ..core.runtime import (
    autocast,
    build_model,
    collate,
    normalize_weights,
    output_stride,
    pad_to_multiple,
    sample_id,
    to_probs,
)
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

VIEWS = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270")


def parse_tta(spec: str | Sequence[str] | None) -> list[str]:
    """``"hflip,vflip,rot90"`` -> views (``rot90`` adds the three rotations; identity always first)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec or []) if s.strip()]
    views = ["identity"]
    for item in items:
        expanded = ["rot90", "rot180", "rot270"] if item == "rot90" else [item]
        for view in expanded:
            if view not in VIEWS and view != "none":
                raise ValueError(f"unknown TTA view {item!r}; choose from hflip, vflip, rot90, rot180")
            if view not in views and view != "none":
                views.append(view)
    return views


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """Augment a ``[..., H, W]`` batch."""
    if view == "identity":
        return x
    if view == "hflip":
        return x.flip(-1)
    if view == "vflip":
        return x.flip(-2)
    return torch.rot90(x, {"rot90": 1, "rot180": 2, "rot270": 3}[view], dims=(-2, -1))


def invert_view(y: torch.Tensor, view: str) -> torch.Tensor:
    """Undo ``apply_view`` on a prediction."""
    if view.startswith("rot"):
        return torch.rot90(y, -{"rot90": 1, "rot180": 2, "rot270": 3}[view], dims=(-2, -1))
    return apply_view(y, view)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@dataclass
class ModelSpec:
    """One model ready for inference: its input normalisation, input size (``eval_size``: the side it was
    validated at; ``None``: native), stride and ensemble weight."""

    model: nn.Module
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    weight: float = 1.0
    multiple: int = 32
    name: str = "model"
    input_size: tuple[int, int] | None = None  # (height, width)
    fold: int | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return images
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std


@dataclass
class InferenceOptions:
    """TTA views and scales, sliding-window tile/overlap (``tile=None``: whole images), precision."""

    views: list[str] = field(default_factory=lambda: ["identity"])
    scales: list[float] = field(default_factory=lambda: [1.0])
    tile: int | None = None
    overlap: int = 128
    tile_batch: int = 8
    amp: str = "none"
    channels_last: bool = False


@torch.no_grad()
def tta_probs(spec: ModelSpec, images: torch.Tensor, opts: InferenceOptions) -> torch.Tensor:
    """Class probabilities ``[B, C, H, W]`` of normalised ``images``, averaged over every TTA view and scale.

    Each scaled input is mirror-padded to the model's stride, and predictions are cropped and resized back.
    """
    size = tuple(images.shape[-2:])
    total, count = None, 0
    for scale in opts.scales:
        scaled = images if scale == 1.0 else _resize(images, (round(size[0] * scale), round(size[1] * scale)))
        padded, (h, w) = pad_to_multiple(scaled, spec.multiple)
        groups: dict[tuple[int, int], list[str]] = {}
        for view in opts.views:  # rotations of a non-square input change its shape: one forward per shape
            groups.setdefault(tuple(apply_view(padded[:1, :1], view).shape[-2:]), []).append(view)
        for views in groups.values():
            batch = torch.cat([apply_view(padded, v) for v in views])
            if opts.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(images.device, opts.amp):
                probs = to_probs(spec.model(batch))
            for view, p in zip(views, probs.split(len(images))):
                p = invert_view(p, view)[..., :h, :w]
                p = _resize(p, size)
                total = p if total is None else total + p
                count += 1
    return total / count


def gaussian_window(tile: int, sigma_scale: float = 0.125, device: Any = "cpu") -> torch.Tensor:
    """``[tile, tile]`` Gaussian blending weights (max 1), floored so tile corners still count."""
    coords = torch.arange(tile, dtype=torch.float32, device=device) - (tile - 1) / 2
    g = torch.exp(-(coords**2) / (2 * (sigma_scale * tile) ** 2))
    window = g[:, None] * g[None, :]
    return (window / window.max()).clamp(min=1e-3)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def sliding_window_probs(spec: ModelSpec, images: torch.Tensor, opts: InferenceOptions) -> torch.Tensor:
    """Overlap-tile inference (U-Net paper): mirror-pad by half the overlap, predict tiles (with TTA),
    blend them with Gaussian weights, crop back. Images no larger than the tile go through whole."""
    tile, overlap = opts.tile, opts.overlap
    h, w = images.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return tta_probs(spec, images, opts)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    margin = overlap // 2
    padded = F.pad(
        images, (margin, margin, margin, margin), mode="reflect" if margin < min(h, w) else "replicate"
    )
    ph, pw = padded.shape[-2:]
    extra_h, extra_w = max(0, tile - ph), max(0, tile - pw)
    if extra_h or extra_w:
        padded = F.pad(padded, (0, extra_w, 0, extra_h), mode="replicate")
        ph, pw = padded.shape[-2:]
    stride = tile - overlap
    window = gaussian_window(tile, device=images.device)
    total, weight = None, torch.zeros(ph, pw, device=images.device)
    boxes = [(y, x) for y in _starts(ph, tile, stride) for x in _starts(pw, tile, stride)]
    for i in range(0, len(boxes), max(1, opts.tile_batch // len(images))):
        chunk = boxes[i : i + max(1, opts.tile_batch // len(images))]
        tiles = torch.cat([padded[..., y : y + tile, x : x + tile] for y, x in chunk])
        probs = tta_probs(spec, tiles, opts)
        if total is None:
            total = images.new_zeros(len(images), probs.shape[1], ph, pw, dtype=torch.float32)
        for (y, x), p in zip(chunk, probs.split(len(images))):
            total[..., y : y + tile, x : x + tile] += p * window
            weight[y : y + tile, x : x + tile] += window
    return (total / weight)[..., margin : margin + h, margin : margin + w]


class Ensemble:
    """A weighted average of models' probabilities (weights normalised to sum 1)."""

    def __init__(self, specs: Sequence[ModelSpec], opts: InferenceOptions | None = None):
        if not specs:
            raise ValueError("an ensemble needs at least one model")
        self.weights = normalize_weights([s.weight for s in specs], len(specs))
        self.specs, self.opts = list(specs), opts or InferenceOptions()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[B, C, H, W]`` of raw ``[0, 1]`` images (each model normalises its own input)."""
        out, size = None, tuple(images.shape[-2:])
        for spec, weight in zip(self.specs, self.weights):
            if weight == 0:
                continue
            x = spec.normalize(images)
            if spec.input_size is not None:
                x = _resize(x, spec.input_size)
            p = _resize(sliding_window_probs(spec, x, self.opts), size) * float(weight)
            out = p if out is None else out + p
        return out


@dataclass
class LoadedRuns:
    """The fold models of some runs (``load_runs``), their class names, what the runs are
    (``provenance.RunInfo``) and the problems accepted with ``allow_partial``."""

    specs: list[ModelSpec]
    names: list[str]
    infos: list[Any]
    partial: list[str]
    background: int | None = 0
    weights: list[float] | None = None  # per run, checked and normalised once, where they were read

    def by_fold(self) -> dict[int, list[ModelSpec]]:
        """The models of each fold number (every run's fold-k model under k)."""
        out: dict[int, list[ModelSpec]] = {}
        for spec in self.specs:
            out.setdefault(int(spec.fold), []).append(spec)
        return dict(sorted(out.items()))


def load_runs(
    runs: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    device: Any = "cpu",
    allow_partial: bool = False,
    engine: str = "torch",
) -> LoadedRuns:
    """Every fold of every run as a ``ModelSpec``; a run's weight is split evenly over its folds. Runs whose
    folds did not all finish are refused unless ``allow_partial`` (``provenance.check_complete``); the class
    names must agree across runs. ``engine="onnxruntime"``: each fold's ``model.onnx``
    (``competition.inference.bundle``) runs instead of the eager model."""
    from ..predictions.provenance import common_background, complete_runs

    if engine not in ("torch", "onnxruntime"):
        raise ValueError(f"engine must be 'torch' or 'onnxruntime', got {engine!r}")
    run_weights = normalize_weights(weights, len(runs))  # checked before any model is loaded
    infos, partial = complete_runs(runs, allow_partial)
    specs, names = [], None
    for info, run_weight in zip(infos, run_weights):
        dirs = info.fold_dirs()
        for d in dirs:
            if engine == "onnxruntime":  # the eager model is never built
                from .onnx import ONNX_FILE, OnnxModel

                model, cfg, meta = OnnxModel(d / ONNX_FILE), ckpt.read_run_config(d), ckpt.read_best_meta(d)
                multiple = model.output_stride or output_stride(build_model(cfg, len(meta["classes"]), False))
            else:
                model, cfg, meta = ckpt.load_fold_model(d, device)
                multiple = output_stride(model)
            if names is None:
                names = meta["classes"]
            elif meta["classes"] != names:
                raise ckpt.CheckpointError(f"{d} predicts classes {meta['classes']}, other runs {names}")
            imagenet = cfg.augment.normalize == "imagenet"
            specs.append(
                ModelSpec(
                    model,
                    IMAGENET_MEAN if imagenet else None,
                    IMAGENET_STD if imagenet else None,
                    weight=float(run_weight) / len(dirs),
                    multiple=multiple,  # as validation pads (an ONNX graph records its model's stride)
                    name=f"{cfg.name}/{d.name}",
                    input_size=cfg.augment.hw(cfg.augment.eval_size),
                    fold=int(meta["fold"]),
                )
            )
    weights = run_weights.tolist()
    return LoadedRuns(specs, list(names or []), infos, partial, common_background(infos), weights)


def load_specs(
    runs: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    device: Any = "cpu",
    allow_partial: bool = False,
) -> tuple[list[ModelSpec], list[str]]:
    """``load_runs`` reduced to the specs and the class names."""
    loaded = load_runs(runs, weights, device, allow_partial)
    return loaded.specs, loaded.names


def iterate_predictions(
    ensemble: Ensemble, loader: DataLoader, device: Any = "cpu"
) -> Iterator[tuple[Any, str, torch.Tensor]]:
    """``(image_id, file_name, probs [C, H, W])`` per image, streamed batch by batch (probs on CPU)."""
    for image_id, file_name, probs in iterate_group_predictions({None: ensemble}, loader, device):
        yield image_id, file_name, probs[None]


def iterate_group_predictions(
    ensembles: Mapping[Any, Ensemble], loader: DataLoader, device: Any = "cpu"
) -> Iterator[tuple[Any, str, dict[Any, torch.Tensor]]]:
    """``(image_id, file_name, {key: probs [C, H, W]})`` per image: every ensemble on each batch, which is
    read once (e.g. one ensemble per fold for fold-matched pseudo-labels)."""
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        probs = {key: ensemble(images).cpu() for key, ensemble in ensembles.items()}
        for i in range(len(images)):
            yield sample_id(batch["image_id"][i]), batch["file_name"][i], {k: p[i] for k, p in probs.items()}


def image_loader(dataset: Any, sizes: set, batch_size: int, workers: int, device: Any) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size if len(sizes) <= 1 else 1,  # mixed sizes: one image per batch
        num_workers=workers,
        pin_memory=str(device).startswith("cuda"),
        collate_fn=collate,
    )
