"""What a config trains with: the loss, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from smp_unet3p.losses import DeepSupervisionLoss, get_loss

from ..core.config import Config, ConfigError


def configured_loss(cfg: Config, classes: int, names: Sequence[str] | None = None) -> nn.Module:
    """``loss.name`` for ``classes`` outputs, its cross-entropy / focal term weighted by
    ``loss.class_weights``, which must fit the loss (it needs a per-pixel term) and the classes: one weight
    per class, in ``names`` order (a one-class, binary model: background, then the class)."""
    weights = cfg.loss.class_weights
    if weights is not None and len(weights) != max(classes, 2):
        which = "" if names is None else f" ({', '.join(['background', *names] if classes == 1 else names)})"
        raise ConfigError(
            f"loss.class_weights has {len(weights)} entries but the model predicts {max(classes, 2)} classes"
            f"{which}: give one weight per class, in that order"
        )
    try:
        return get_loss(cfg.loss.name, classes, cfg.loss.ignore_index, weights)
    except ValueError as exc:
        if weights is None:
            raise
        raise ConfigError(f"loss.class_weights: {exc}") from None


def build_criterion(cfg: Config, classes: int) -> DeepSupervisionLoss:
    """The configured loss on every output the model gives (main, side outputs, CGM presence)."""
    return DeepSupervisionLoss(
        configured_loss(cfg, classes),
        classes,
        side_weights=cfg.loss.side_weight,
        cgm_weight=cfg.loss.cgm_weight,
        ignore_index=cfg.loss.ignore_index,
    )


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; no weight decay on norm layers and biases (1-D parameters); parameters outside
    ``model.encoder`` (decoder and heads) at ``optimizer.decoder_lr_scale`` times the learning rate.
    Adam(W) use torch's fused kernel: the same update in one pass over the parameters (2-core CPU, the demo's
    model: the optimizer step 3.4x faster than the default ``foreach`` kernel, a whole training step 1.16x;
    ``benchmarks/optimizer_step.py``)."""
    o = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    parts = [(params, o.lr)]  # one lr: the two groups that last.ckpt files of earlier versions hold
    if o.decoder_lr_scale != 1.0:
        encoder = getattr(model, "encoder", None)
        in_encoder = {id(p) for p in encoder.parameters()} if isinstance(encoder, nn.Module) else set()
        parts = [
            ([p for p in params if id(p) in in_encoder], o.lr),
            ([p for p in params if id(p) not in in_encoder], o.lr * o.decoder_lr_scale),
        ]
    groups = []
    for members, lr in parts:
        groups += [
            {"params": [p for p in members if p.ndim > 1], "weight_decay": o.weight_decay, "lr": lr},
            {"params": [p for p in members if p.ndim <= 1], "weight_decay": 0.0, "lr": lr},
        ]
    groups = [g for g in groups if g["params"]]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    return (torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam)(groups, lr=o.lr, fused=True)


def lr_factor(cfg: Config, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up, then cosine/poly/constant."""
    s = cfg.scheduler
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if s.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.name == "cosine" else (1 - progress) ** s.power
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape


def build_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` per optimizer step over the whole run (``train.epochs * steps_per_epoch`` steps)."""
    total = steps_per_epoch * cfg.train.epochs
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, total, steps_per_epoch))
