"""Train one fold (or all): a plain loop with AMP, gradient accumulation, EMA, resume and DDP.

Run directory ``<output_dir>/<name>/fold<k>/``:

- ``config.yaml``: the resolved config (rebuilds the model for inference);
- ``metrics.csv``: per epoch train/val loss, mIoU, per-class IoU, lr, seconds; ``curves.png``;
- ``best.safetensors`` + ``best.json``: best validation mIoU weights (EMA weights when EMA is on);
- ``last.ckpt``: model, optimizer, scheduler, scaler, EMA, epoch and RNG states for ``--resume`` (every
  ``train.checkpoint_every`` epochs and after the last);
- ``oof.npz``: out-of-fold predictions of the best weights (one entry per validation image).

Non-finite losses: ``train.nan_policy: stop`` (default) raises ``NonFiniteLossError`` naming the epoch and
step before anything is saved from that epoch; ``skip`` drops the micro-batch from its step and stops after
``train.max_skipped_steps`` consecutive ones. With ``amp: fp16`` the grad scaler skips steps whose gradients
overflow, as usual.

Distributed: launch with ``torchrun --nproc_per_node N -m competition.cli train ...``; each rank trains on
its ``DistributedSampler`` shard, validation is sharded and its confusion matrix and losses all-reduced; only
rank 0 writes files (out-of-fold predictions are made by rank 0 alone after training).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

from smp_unet3p import create_model
from smp_unet3p.losses import DeepSupervisionLoss, get_loss

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .data.transforms import EpochSeeded, build_eval_transform, build_train_transform
from .io import NpzStreamWriter, OutputExistsError, atomic_write, atomic_write_csv, atomic_write_text
from .metrics import ConfusionMatrix


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class FoldResult:
    fold: int
    run_dir: Path
    best_miou: float
    best_epoch: int
    metrics: pd.DataFrame


# ----------------------------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group ``torchrun`` describes in the environment (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def class_names(cfg: Config) -> list[str]:
    """Class names of the run (index = class id, 0 = background)."""
    from .data.coco import default_class_names, read_merge_map

    data = cfg.data
    if data.classes is not None:
        return list(data.classes)
    if data.format == "folder":
        return ["background", "foreground"]
    return list(default_class_names(read_merge_map(data.merge_map) if data.merge_map else None))


def read_folds_table(path: Path) -> pd.DataFrame:
    """A folds CSV (``image_id``, ``fold``, ...), checked."""
    if not path.is_file():
        raise FileNotFoundError(f"folds file {path} not found (data.folds); make it with `competition folds`")
    table = pd.read_csv(path)
    missing = {"image_id", "fold"} - set(table.columns)
    if missing:
        raise ConfigError(f"folds file {path} lacks column(s) {sorted(missing)}")
    return table


def read_folds(path: Path, fold: int) -> tuple[list[Any], list[Any]]:
    """Train ids and validation ids of ``fold`` from a folds CSV."""
    table = read_folds_table(path)
    folds = sorted(table["fold"].unique())
    if fold not in folds:
        raise ConfigError(f"fold {fold} not in {path} (folds: {folds})")
    val = table["fold"] == fold
    return table.loc[~val, "image_id"].tolist(), table.loc[val, "image_id"].tolist()


def build_datasets(cfg: Config, fold: int, rank0: Dist | None = None) -> tuple[Dataset, Dataset, list[str]]:
    """Training (augmented) and validation datasets of one fold, and the class names."""
    names = class_names(cfg)
    train_ids, val_ids = read_folds(cfg.data.folds, fold)
    train_tf, eval_tf = build_train_transform(cfg.augment), build_eval_transform(cfg.augment)
    if cfg.data.format == "folder":
        from .data.datasets import MaskFolderDataset

        def make(ids: list[Any], tf: Any) -> Dataset:
            return MaskFolderDataset(
                cfg.data.image_dir, cfg.data.mask_dir, tf, cfg.data.value_map, [str(i) for i in ids]
            )

        return make(train_ids, train_tf), make(val_ids, eval_tf), names

    from .data.coco import ClassMap, MaskCache, load_coco, read_merge_map
    from .data.datasets import CocoSegmentationDataset

    coco = load_coco(cfg.data.annotations, cfg.data.root)
    merge = read_merge_map(cfg.data.merge_map) if cfg.data.merge_map else None
    class_map = ClassMap.build(coco.categories, names, merge, source=str(cfg.data.annotations))
    cache = MaskCache(coco, class_map, cfg.data.cache_dir or cfg.data.root / ".mask_cache", cfg.data.crowd)
    if rank0 is None or rank0.main:
        cache.build(progress=cfg.train.progress)
    if rank0 is not None:
        rank0.barrier()
    return (
        CocoSegmentationDataset(cache, cfg.data.root, train_ids, train_tf),
        CocoSegmentationDataset(cache, cfg.data.root, val_ids, eval_tf),
        names,
    )


def build_model(cfg: Config, classes: int, pretrained: bool = True) -> nn.Module:
    """The configured model; ``pretrained=False`` skips encoder weights (they come from a checkpoint)."""
    if cfg.model.classes is not None and cfg.model.classes != classes:
        raise ConfigError(f"model.classes={cfg.model.classes} but the data has {classes} classes")
    return create_model(
        cfg.model.arch,
        cfg.model.encoder_name,
        encoder_weights=cfg.model.encoder_weights if pretrained else None,
        in_channels=cfg.model.in_channels,
        classes=classes,
        **cfg.model.params,
    )


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; no weight decay on norm layers and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    return (torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam)(groups, lr=o.lr)


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


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` with a clear error for images of different sizes in one batch."""
    sizes = {tuple(b["image"].shape[-2:]) for b in batch}
    if len(sizes) > 1:
        raise ValueError(
            f"images of different sizes {sorted(sizes)} in one batch ({[b['file_name'] for b in batch]}); "
            "set augment.size (training crop) and augment.eval_size (validation resize), or batch size 1"
        )
    return default_collate(batch)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def batch_to_device(
    batch: dict[str, Any], device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (optionally channels_last) and masks of a batch on ``device``."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["mask"].to(device, non_blocking=True)


def main_logits(output: Any) -> torch.Tensor:
    """The mask logits of any model output (tensor, smp ``(masks, labels)`` tuple or our train dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output["masks"]


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    classes: int,
    device: torch.device,
    cfg: Config,
    on_batch: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
    all_reduce: bool = True,
) -> tuple[float, ConfusionMatrix]:
    """Mean validation loss and the confusion matrix of the whole loader (summed over DDP ranks when
    ``all_reduce``; pass ``False`` when only this rank evaluates)."""
    model.eval()
    matrix = ConfusionMatrix(classes, cfg.loss.ignore_index, device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        images, masks = batch_to_device(batch, device, cfg.train.channels_last)
        with autocast(device, cfg.train.amp):
            logits = main_logits(model(images)).float()
        loss_sum += torch.stack(
            [criterion(logits, masks).double() * len(images), loss_sum.new_tensor(len(images))]
        )
        matrix.update(logits.argmax(1), masks)
        if on_batch is not None:
            on_batch(batch, logits)
    if all_reduce and dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        matrix.all_reduce()
    return float(loss_sum[0] / loss_sum[1].clamp(min=1)), matrix


class OofWriter:
    """Streams out-of-fold predictions into an ``.npz``: ``pred__<id>`` (float16 ``[C, h, w]`` probabilities,
    or uint8 ``[h, w]`` argmax) and ``target__<id>`` (the mask at the same size), plus ``image_ids``.

    With ``size`` the maps are resized to ``size x size`` (bilinear probabilities, nearest targets) to keep
    files small; OOF scores then need no access to the data.
    """

    def __init__(self, path: Path, mode: str, size: int | None):
        self.writer, self.mode, self.size, self.ids = NpzStreamWriter(path), mode, size, []

    def __enter__(self) -> OofWriter:
        self.writer.__enter__()
        return self

    def add(self, batch: dict[str, Any], logits: torch.Tensor) -> None:
        probs = logits.float().softmax(1)
        masks = batch["mask"].to(probs.device)
        if self.size is not None:
            probs = F.interpolate(probs, size=(self.size, self.size), mode="bilinear", align_corners=False)
            masks = F.interpolate(masks[:, None].float(), size=(self.size, self.size), mode="nearest")
            masks = masks[:, 0].long()
        for image_id, p, m in zip(batch["image_id"], probs.cpu(), masks.cpu()):
            key = str(image_id.item() if torch.is_tensor(image_id) else image_id)
            self.ids.append(key)
            value = p.half().numpy() if self.mode == "probs" else p.argmax(0).to(torch.uint8).numpy()
            self.writer.put(f"pred__{key}", value)
            self.writer.put(f"target__{key}", m.to(torch.uint8).numpy())

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.writer.put("image_ids", np.array(self.ids))
        self.writer.__exit__(kind, *rest)


# -------------------------------------------------------------------------------------------- records
def write_curves(metrics: pd.DataFrame, path: Path) -> None:
    """Loss, mIoU and learning-rate curves of one fold as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(metrics["epoch"], metrics["train_loss"], label="train")
    axes[0].plot(metrics["epoch"], metrics["val_loss"], label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(metrics["epoch"], metrics["miou"], marker="o")
    axes[1].set_title("validation mIoU")
    axes[2].plot(metrics["epoch"], metrics["lr"])
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------ training
EpochCallback = Callable[[int, dict[str, Any]], None]


def train_fold(
    cfg: Config,
    fold: int,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: EpochCallback | None = None,
) -> FoldResult:
    """Train fold ``fold`` of ``cfg`` into ``cfg.run_dir(fold)`` and write its out-of-fold predictions.

    ``resume=True`` continues from ``last.ckpt`` (a finished fold is not retrained); without it an existing
    run directory is an error unless ``overwrite``. ``on_epoch_end(epoch, row)`` runs after each epoch's
    files are written (rank 0).
    """
    ddp, device = init_distributed(cfg.train.device)
    run_dir = cfg.run_dir(fold)
    last_path = run_dir / ckpt.LAST
    if ddp.main:
        if last_path.exists() and not (resume or overwrite):
            raise OutputExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over"
            )
        if overwrite and not resume:
            for name in (ckpt.LAST, ckpt.BEST_WEIGHTS, ckpt.BEST_META, "metrics.csv", "oof.npz"):
                (run_dir / name).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic

    train_set, val_set, names = build_datasets(cfg, fold, ddp)
    classes = len(names)
    model = build_model(cfg, classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
        if cfg.train.ema_decay
        else None
    )
    optimizer = build_optimizer(cfg, model)
    seeded = EpochSeeded(train_set, cfg.train.seed)
    sampler_gen = torch.Generator()
    sampler = (
        DistributedSampler(seeded, ddp.world, ddp.rank, shuffle=True, seed=cfg.train.seed)
        if ddp.enabled
        else RandomSampler(seeded, generator=sampler_gen)
    )
    loader_args = dict(num_workers=cfg.train.workers, pin_memory=device.type == "cuda", collate_fn=collate)
    train_loader = DataLoader(
        seeded,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=len(train_set) // ddp.world > cfg.train.batch_size,
        **loader_args,
    )
    val_shard = Subset(val_set, range(ddp.rank, len(val_set), ddp.world))
    val_loader = DataLoader(
        val_shard, batch_size=cfg.train.val_batch_size or cfg.train.batch_size, shuffle=False, **loader_args
    )
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.accum_steps)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    criterion = DeepSupervisionLoss(
        get_loss(cfg.loss.name, classes, cfg.loss.ignore_index),
        classes,
        side_weights=cfg.loss.side_weight,
        cgm_weight=cfg.loss.cgm_weight,
        ignore_index=cfg.loss.ignore_index,
    )

    start_epoch, best, rows = 0, {"miou": -math.inf, "epoch": -1}, []
    skips = {"total": 0, "consecutive": 0}
    if resume and last_path.is_file():
        state = ckpt.load_last(last_path, device)
        _check_resumable(cfg, ckpt.read_run_config(run_dir), run_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best, skips = state["epoch"], dict(state["best"]), dict(state["skipped"])
        ckpt.set_rng_state(state["rng"])
        metrics_path = run_dir / "metrics.csv"
        if metrics_path.is_file():
            rows = pd.read_csv(metrics_path).query("epoch <= @start_epoch").to_dict("records")
        if ddp.main:
            print(f"fold {fold}: resuming after epoch {start_epoch} from {last_path}")
    elif resume and ddp.main:
        print(f"fold {fold}: nothing to resume in {run_dir}, starting from scratch")
    if ddp.main:
        atomic_write_text(run_dir / ckpt.CONFIG_FILE, cfg.to_yaml())

    train_model: nn.Module = model
    if ddp.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    eval_model = ema.module if ema is not None else model

    for epoch in range(start_epoch, cfg.train.epochs):
        seeded.set_epoch(epoch)
        if ddp.enabled:
            sampler.set_epoch(epoch)
        sampler_gen.manual_seed(cfg.train.seed + epoch)
        started = time.perf_counter()
        train_loss = _train_one_epoch(
            cfg, epoch, fold, train_model, model, ema, train_loader, criterion, optimizer, scheduler,
            scaler, device, ddp, skips,
        )  # fmt: skip
        train_seconds = time.perf_counter() - started
        val_loss, matrix = evaluate(eval_model, val_loader, criterion, classes, device, cfg)
        iou, miou = matrix.iou(), matrix.miou()
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "miou": miou,
            **{f"iou_{n}": v for n, v in zip(names, iou)},
            "pixel_acc": matrix.pixel_accuracy(),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            "train_img_s": len(train_loader) * cfg.train.batch_size * ddp.world / train_seconds,
        }
        rows.append(row)
        improved = math.isfinite(miou) and miou > best["miou"]
        if improved:
            best = {"miou": miou, "epoch": epoch + 1}
        if ddp.main:
            if improved:
                meta = _best_meta(cfg, fold, names, epoch + 1, miou, iou, ema is not None)
                ckpt.write_best(run_dir, _unwrap(eval_model), meta)
            frame = pd.DataFrame(rows)
            atomic_write_csv(run_dir / "metrics.csv", frame)
            write_curves(frame, run_dir / "curves.png")
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
                ckpt.save_last(
                    last_path,
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "best": best,
                        "skipped": skips,
                        "rng": ckpt.rng_state(),
                    },
                )
            tqdm.write(
                f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}  train_loss {train_loss:.4f}  "
                f"val_loss {val_loss:.4f}  mIoU {miou:.4f}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
                + ("  *best" if improved else "")
            )
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
        ddp.barrier()

    if ddp.main and cfg.train.oof != "none" and (run_dir / ckpt.BEST_WEIGHTS).is_file():
        write_oof(cfg, run_dir, val_set, classes, device, criterion)
    ddp.barrier()
    return FoldResult(fold, run_dir, best["miou"], best["epoch"], pd.DataFrame(rows))


def _train_one_epoch(
    cfg: Config,
    epoch: int,
    fold: int,
    train_model: nn.Module,
    model: nn.Module,
    ema: AveragedModel | None,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    ddp: Dist,
    skips: dict[str, int],
) -> float:
    """One pass over the training loader; returns the mean loss (all ranks). ``skips`` counts skipped steps
    (``total`` and ``consecutive``, carried across epochs)."""
    train_model.train()
    accum = cfg.train.accum_steps
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    bar = tqdm(
        loader,
        desc=f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}",
        leave=False,
        disable=not (cfg.train.progress and ddp.main),
        dynamic_ncols=True,
    )
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(bar):
        images, masks = batch_to_device(batch, device, cfg.train.channels_last)
        sync = (step + 1) % accum == 0 or step + 1 == len(loader)
        no_sync = (
            train_model.no_sync if ddp.enabled and not sync and hasattr(train_model, "no_sync") else None
        )
        with no_sync() if no_sync else contextlib.nullcontext():
            with autocast(device, cfg.train.amp):
                loss = criterion(train_model(images), masks)
            if not torch.isfinite(loss):
                skips["consecutive"] += 1
                skips["total"] += 1
                where = f"epoch {epoch + 1}, step {step + 1} of fold {fold}"
                if cfg.train.nan_policy == "stop" or skips["consecutive"] > cfg.train.max_skipped_steps:
                    count = skips["consecutive"]
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at {where}"
                        + (f" ({count} consecutive non-finite steps)" if count > 1 else "")
                        + ". Nothing from this epoch was saved; last.ckpt holds the previous epoch. Try a "
                        "lower optimizer.lr, train.grad_clip, amp=bf16 not fp16, or train.nan_policy=skip."
                    )
                tqdm.write(f"warning: non-finite loss at {where}; micro-batch skipped")
            else:
                skips["consecutive"] = 0
                scaler.scale(loss / accum).backward()
                loss_sum += torch.stack(
                    [loss.detach().double() * len(images), loss_sum.new_tensor(len(images))]
                )
        if sync:
            if cfg.train.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
        if not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    if ddp.enabled:
        dist.all_reduce(loss_sum)
    return float(loss_sum[0] / loss_sum[1].clamp(min=1))


def _best_meta(
    cfg: Config, fold: int, names: list[str], epoch: int, miou: float, iou: np.ndarray, ema: bool
) -> dict[str, Any]:
    return {
        "fold": fold,
        "epoch": epoch,
        "miou": miou,
        "iou": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "classes": names,
        "arch": cfg.model.arch,
        "encoder_name": cfg.model.encoder_name,
        "ema": ema,
        "normalize": cfg.augment.normalize,
    }


def _check_resumable(cfg: Config, saved: Config, run_dir: Path) -> None:
    """Resuming with another model, loss, optimizer or data would silently train something else."""
    keys = ("data", "model", "loss", "optimizer", "scheduler", "augment")
    changed = [
        f"{section}.{k}"
        for section in keys
        for k, v in getattr(cfg, section).model_dump().items()
        if getattr(saved, section).model_dump()[k] != v
    ]
    changed += [
        f"train.{k}"
        for k in ("batch_size", "accum_steps", "seed", "epochs")
        if getattr(cfg.train, k) != getattr(saved.train, k)
    ]
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from its config.yaml in {changed}; resume with the "
            "same settings or start over with --overwrite"
        )


def write_oof(
    cfg: Config, run_dir: Path, val_set: Dataset, classes: int, device: torch.device, criterion: nn.Module
) -> float:
    """Predict the validation fold with the best weights into ``oof.npz``; returns its mIoU."""
    model, _, _ = ckpt.load_fold_model(run_dir, device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        val_set, batch_size=cfg.train.val_batch_size or cfg.train.batch_size, collate_fn=collate,
        num_workers=cfg.train.workers,
    )  # fmt: skip
    with OofWriter(run_dir / "oof.npz", cfg.train.oof, cfg.train.oof_size) as writer:
        _, matrix = evaluate(
            model, loader, criterion, classes, device, cfg, on_batch=writer.add, all_reduce=False
        )
    return matrix.miou()


def parse_folds(spec: str, folds_file: Path) -> list[int]:
    """``"all"`` (every fold of the folds file) or comma-separated fold numbers."""
    if spec == "all":
        return sorted(int(f) for f in read_folds_table(folds_file)["fold"].unique())
    parts = [p.strip() for p in spec.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"--fold must be 'all' or fold numbers like 0,2; got {spec!r}")
    return [int(p) for p in parts]


def train(cfg: Config, folds: str = "all", resume: bool = False, overwrite: bool = False) -> list[FoldResult]:
    """Train the requested folds one after the other; returns one result per fold."""
    return [train_fold(cfg, k, resume, overwrite) for k in parse_folds(folds, cfg.data.folds)]
