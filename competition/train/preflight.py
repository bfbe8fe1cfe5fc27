"""Checks that take seconds before a training run takes hours. ``competition train`` runs them before it
creates any run folder, so a wrong data root, an unreadable image, encoder weights that do not resolve or a
model that cannot run at the training crop fail at once, naming what to fix, and leave nothing behind."""

from __future__ import annotations

import time

import torch

from ..core.config import Config, ConfigError
from ..core.runtime import build_model, main_logits, resolve_device
from ..data import images
from ..data.classes import ClassMap, class_names
from ..data.splits import data_files, paste_classes
from .optim import configured_loss


class PreflightError(ConfigError):
    """A training run would fail: found before any epoch."""


def check_images(cfg: Config) -> tuple[int, tuple[int, int]]:
    """Every image the data names exists and ``DECODED`` of them decode (``data.images.check_images``);
    returns the image count and the first decoded image's ``(height, width)``."""
    files, root = data_files(cfg)
    source = cfg.data.image_dir if cfg.data.format == "folder" else cfg.data.annotations
    flag = "data.image_dir" if cfg.data.format == "folder" else "data.root"
    try:
        return images.check_images(root, sorted(files.values()), str(source), flag)
    except OSError as exc:  # MissingImagesError included: a preflight error says it is found before training
        raise PreflightError(str(exc)) from None


def check_model(cfg: Config, image_shape: tuple[int, int]) -> float:
    """The model builds (encoder weights resolve) and runs one forward and backward pass, batch 2, at the
    training crop (``augment.size``, or full images) on the configured device; returns its seconds per
    image (a first pass: slower than later ones, so a cautious guess of the training cost)."""
    size = cfg.augment.size
    height, width = cfg.augment.hw(size) or image_shape
    device = resolve_device(cfg.train.device)
    try:
        model = build_model(cfg, len(class_names(cfg))).to(device).train()
    except ValueError as exc:
        if "downsampling pattern" not in str(exc):
            raise
        raise PreflightError(
            f"encoder {cfg.model.encoder_name} cannot feed {cfg.model.arch}: {exc} A plain ViT has no "
            "feature pyramid; use a hierarchical timm encoder (tu-swin_*, tu-convnext_*, tu-efficientnet_*)"
        ) from None
    try:
        started = time.perf_counter()
        output = model(torch.randn(2, cfg.model.in_channels, height, width, device=device))
        main_logits(output).float().mean().backward()
        return (time.perf_counter() - started) / 2
    except (RuntimeError, ValueError, AssertionError) as exc:  # timm asserts the input size of ViT / Swin
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        hint = (
            " The encoder is built for one input size: set model.params.dynamic_img_size=true (timm "
            f"ViT/Swin/MaxViT encoders) or model.params.img_size={height} (or train at its img_size)."
            if "match model" in message or "img_size" in message
            else " Change augment.size (a multiple of the encoder's output stride, usually 32) or the model."
        )
        raise PreflightError(
            f"model {cfg.model.arch} / {cfg.model.encoder_name} fails at the training crop {height}x{width}"
            f"{' (augment.size)' if size else ' (full images: augment.size is null)'}: {message}.{hint}"
        ) from None


def check_data(cfg: Config) -> tuple[int, tuple[int, int]]:
    """The class names the config gives (and a class weight for each), then ``check_images``: what every run
    of this data needs, whichever model it trains (``competition sweep`` checks it before any trial)."""
    names = class_names(cfg)
    configured_loss(cfg, len(names), names)  # its class weights fit the loss and the classes
    if cfg.augment.copy_paste:
        paste_classes(
            cfg.augment.copy_paste_classes,
            ClassMap(tuple(names), {}, cfg.data.background_index() is not None),
        )
    return check_images(cfg)


def preflight(cfg: Config) -> float:
    """``check_data`` then ``check_model``; returns a guess of one epoch's seconds (every image through a
    training step), which ``train.time_limit`` budgets for the first epoch before one has run."""
    count, shape = check_data(cfg)
    return count * check_model(cfg, shape)
