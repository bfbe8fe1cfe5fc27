"""Train one fold (or all): a plain loop with AMP, gradient accumulation, EMA, resume and DDP.

Run directory ``<output_dir>/<name>/fold<k>/``: ``config.yaml`` (the resolved config; rebuilds the model);
``metrics.csv`` (per epoch losses, mIoU, per-class IoU, lr, seconds) and ``curves.png``; ``best.safetensors``
+ ``best.json`` (best validation mIoU weights; EMA weights when EMA is on); ``last.ckpt`` (every state
``--resume`` needs: ``resume.last_state``); ``oof.npz`` (out-of-fold predictions, ``oof``).

Validation: mIoU from the model's eval output (CGM-gated, as inference predicts); the validation loss from the
ungated logits (``runtime.eval_outputs``). A resumed run never replaces a best checkpoint by a worse one.
Stopping: ``train.patience`` finishes a fold after that many epochs without a better mIoU;
``train.time_limit`` starts no epoch that would end after it (the run is resumed later); Ctrl-C / SIGTERM
wait until the epoch's files are all written (``io.uninterrupted``).

Non-finite losses: ``train.nan_policy: stop`` (default) raises ``NonFiniteLossError`` naming the epoch and
step before anything is saved from that epoch; ``skip`` drops the micro-batch and stops after
``train.max_skipped_steps`` consecutive ones. Under DDP every rank takes the same decision (the flag is
all-reduced). That check is the step's one host sync.

Distributed: ``torchrun --nproc_per_node N -m competition.cli train ...``; each rank trains on its shard,
validation is sharded and all-reduced; only rank 0 writes files (and the out-of-fold predictions).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm  # not tqdm.auto: its asyncio variant opens a second DataLoader iterator

from ..core import checkpoint as ckpt
from ..core.config import Config
from ..core.io import OutputExistsError, atomic_write_csv, atomic_write_text, remove, uninterrupted
from ..core.metrics import ConfusionMatrix
from ..core.runtime import (
    autocast,
    batch_to_device,
    build_model,
    collate,
    cpu_threads,
    init_distributed,
    unwrap,
)
from ..data.splits import build_datasets, parse_folds
from ..data.transforms import EpochSeeded
from ..predictions.oof import OOF_FILE
from ..predictions.provenance import config_hash, folds_record, patience_spent
from .averaging import CheckpointAverage
from .optim import build_criterion, build_optimizer, build_scheduler
from .records import Curves, FoldResult, best_meta, epoch_line, estimate_line, startup_line
from .resume import finished_fold, init_weights, last_state, record_folds, restore
from .resume import load_state as resume_state
from .tracking import TRACKING, Trackers
from .validation import evaluate, write_oof

PROGRESS_EVERY = 10  # steps between progress-bar loss updates (each one reads the loss from the device)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class FoldRun:
    """One fold's training: everything is set up in ``__init__``; ``run()`` resumes (if asked), trains and
    validates epoch by epoch, saves, and finally writes the out-of-fold predictions."""

    def __init__(
        self,
        cfg: Config,
        fold: int,
        resume: bool = False,
        overwrite: bool = False,
        deadline: float | None = None,
        first_epoch_s: float | None = None,
    ):
        self.cfg, self.fold, self.resuming, self.deadline, self.stopped = cfg, fold, resume, deadline, None
        self.first_epoch_s = first_epoch_s  # the time limit's guess of an epoch before one has run
        self.ddp, self.device = init_distributed(cfg.train.device)
        self.threads = cpu_threads(cfg.train.threads, cfg.train.workers)
        torch.set_num_threads(self.threads)
        self.run_dir = cfg.run_dir(fold)
        self._prepare_dir(overwrite, create=False)  # refused at once; the folder is made once all is set up
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = not cfg.train.deterministic

        self.origin = {"config_hash": config_hash(cfg), **folds_record(cfg.data.folds)}
        self.train_set, self.val_set, self.names = build_datasets(cfg, fold, self.ddp)
        model = build_model(cfg, len(self.names))
        self.model = init_weights(model, cfg, fold, announce=self.ddp.main and not resume).to(self.device)
        self._prepare_dir(overwrite)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        multi_avg = get_ema_multi_avg_fn(cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.ema = AveragedModel(self.model, multi_avg_fn=multi_avg, use_buffers=True) if multi_avg else None
        self.swa, self.epoch_done = CheckpointAverage(self.model, cfg.train.swa_epochs), -1
        self.optimizer = build_optimizer(cfg, self.model)
        self._build_loaders()
        self.steps = math.ceil(len(self.train_loader) / cfg.train.accum_steps)  # optimizer steps per epoch
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.criterion = build_criterion(cfg, len(self.names))
        self.start_epoch, self.best, self.rows = 0, {"miou": -math.inf, "epoch": -1}, []
        self.skips = {"total": 0, "consecutive": 0}
        self.curves = Curves(self.run_dir / "curves.png")

    # ------------------------------------------------------------------------------------------- setup
    def _prepare_dir(self, overwrite: bool, create: bool = True) -> None:
        if not self.ddp.main:
            return
        if (self.run_dir / ckpt.LAST).exists() and not (self.resuming or overwrite):
            raise OutputExistsError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or --overwrite to start "
                "over"
            )
        if not create:
            return
        if overwrite and not self.resuming:  # a fresh run: nothing of the old one, its tracked runs included
            for name in (ckpt.LAST, ckpt.BEST_WEIGHTS, ckpt.BEST_META, "metrics.csv", OOF_FILE, *TRACKING):
                remove(self.run_dir / name)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _build_loaders(self) -> None:
        cfg, ddp = self.cfg, self.ddp
        self.seeded = EpochSeeded(self.train_set, cfg.train.seed)
        self.sampler_gen = torch.Generator()
        self.sampler = (
            DistributedSampler(self.seeded, ddp.world, ddp.rank, shuffle=True, seed=cfg.train.seed)
            if ddp.enabled
            else RandomSampler(self.seeded, generator=self.sampler_gen)
        )
        args = dict(num_workers=cfg.train.workers, pin_memory=self.device.type == "cuda", collate_fn=collate)
        drop_last = len(self.train_set) // ddp.world > cfg.train.batch_size
        self.train_loader = DataLoader(
            self.seeded, batch_size=cfg.train.batch_size, sampler=self.sampler, drop_last=drop_last, **args
        )
        shard = Subset(self.val_set, range(ddp.rank, len(self.val_set), ddp.world))
        self.val_batch = cfg.train.val_batch_size or cfg.train.batch_size
        self.val_loader = DataLoader(shard, batch_size=self.val_batch, shuffle=False, **args)

    def resume(self) -> None:
        """Restore every state from ``last.ckpt`` (``resume.restore``)."""
        restore(self)

    def state_dict(self) -> dict[str, Any]:
        """Everything ``last.ckpt`` holds after the epochs done (``resume.last_state``: the schema)."""
        return last_state(self, self.epoch_done + 1)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put a ``state_dict`` back (``resume.load_state``)."""
        resume_state(self, state)

    # ---------------------------------------------------------------------------------------- training
    def train_epoch(self, model: nn.Module, epoch: int) -> float:
        """One pass over the training loader; returns the mean loss over all ranks."""
        cfg, accum = self.cfg, self.cfg.train.accum_steps
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)
        show = cfg.train.progress and self.ddp.main
        desc = f"fold {self.fold} epoch {epoch + 1}/{cfg.train.epochs}"
        bar = tqdm(self.train_loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        pending = False  # gradients accumulated since the last optimizer step
        for step, batch in enumerate(bar):
            images, masks = batch_to_device(batch, self.device, cfg.train.channels_last)
            sync = (step + 1) % accum == 0 or step + 1 == len(self.train_loader)
            no_sync = getattr(model, "no_sync", None) if self.ddp.enabled and not sync else None
            with no_sync() if no_sync else contextlib.nullcontext():
                with autocast(self.device, cfg.train.amp):
                    loss = self.criterion(model(images), masks)
                finite = not self.ddp.any(~torch.isfinite(loss))
                if finite:
                    self.skips["consecutive"] = 0
                    self.scaler.scale(loss / accum).backward()
                    loss_sum += torch.stack(
                        [loss.detach().double() * len(images), loss_sum.new_tensor(len(images))]
                    )
                    pending = True
                else:
                    self._skip(loss, epoch, step)
            if sync:  # DDP all-reduces gradients in the sync micro-batch's backward: none, no step
                self._optimizer_step(pending and (finite or not self.ddp.enabled))
                pending = False
            if show and step % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        if self.ddp.enabled:
            dist.all_reduce(loss_sum)
        return float(loss_sum[0] / loss_sum[1].clamp(min=1))

    def _skip(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """Count a non-finite micro-batch; raise when the policy (or the limit of skips in a row) says so."""
        self.skips["consecutive"] += 1
        self.skips["total"] += 1
        where = f"epoch {epoch + 1}, step {step + 1} of fold {self.fold}"
        value = loss.item()
        what = f"loss is {value}" if not math.isfinite(value) else "loss is non-finite on another rank"
        count = self.skips["consecutive"]
        if self.cfg.train.nan_policy == "stop" or count > self.cfg.train.max_skipped_steps:
            raise NonFiniteLossError(
                f"{what} at {where}"
                + (f" ({count} consecutive non-finite steps)" if count > 1 else "")
                + ". Nothing from this epoch was saved; last.ckpt holds the previous epoch. Try a lower "
                "optimizer.lr, train.grad_clip, amp=bf16 not fp16, or train.nan_policy=skip."
            )
        if self.ddp.main:
            tqdm.write(f"warning: non-finite loss at {where}; micro-batch skipped")

    def _optimizer_step(self, pending: bool) -> None:
        """Clip, step, update the EMA (only when gradients were accumulated), then advance the schedule."""
        if pending:
            if self.cfg.train.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ------------------------------------------------------------------------------------ epoch records
    def eval_model(self) -> nn.Module:
        """What is validated and kept: the checkpoint average in its window, else the EMA or the model."""
        averaged = self.swa.module(self.epoch_done, self.cfg.train.epochs)
        if averaged is not None:
            return averaged
        return self.ema.module if self.ema is not None else self.model

    def validate(self) -> tuple[float, ConfusionMatrix]:
        cfg = self.cfg
        return evaluate(self.eval_model(), self.val_loader, self.criterion, len(self.names), self.device, cfg)

    def save(self, epoch: int, row: dict[str, Any], improved: bool) -> None:
        """Rank 0: best weights (when improved), metrics, curves and the resume checkpoint."""
        if improved:
            meta = best_meta(self.cfg, self.fold, self.names, row, self.ema is not None, self.origin)
            ckpt.write_best(self.run_dir, unwrap(self.eval_model()), meta)
        frame = pd.DataFrame(self.rows)
        atomic_write_csv(self.run_dir / "metrics.csv", frame)
        self.curves.update(frame, force=epoch + 1 == self.cfg.train.epochs)
        if (epoch + 1) % self.cfg.train.checkpoint_every == 0 or epoch + 1 == self.cfg.train.epochs:
            ckpt.save_last(self.run_dir / ckpt.LAST, self.state_dict())

    def run(self, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> FoldResult:
        if self.resuming:
            self.resume()
        if self.ddp.main:
            atomic_write_text(self.run_dir / ckpt.CONFIG_FILE, self.cfg.to_yaml())
        model: nn.Module = self.model
        if self.ddp.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.cfg.train.compile:
            model = torch.compile(model)
        epochs, sizes = self.cfg.train.epochs, (len(self.train_set), len(self.val_set))
        if self.ddp.main:
            print(startup_line(self.fold, self.cfg, self.device, self.threads, sizes, self.steps), flush=True)
        with Trackers(self.cfg, self.run_dir, enabled=self.ddp.main) as trackers:
            for epoch in range(self.start_epoch, epochs):
                self.stopped = self.stop_reason(epoch)
                if self.stopped:
                    break
                row, improved = self.epoch(model, epoch)
                if self.ddp.main:
                    with uninterrupted():  # an interrupt waits for the epoch's files and its summary line
                        self.save(epoch, row, improved)
                        kept = improved and self.cfg.train.keep == "best"
                        tqdm.write(epoch_line(self.fold, epochs, row, kept))
                    trackers.epoch(row)
                    if epoch == self.start_epoch and epoch + 1 < epochs:
                        tqdm.write(estimate_line(self.fold, row["seconds"], epochs - epoch - 1))
                    if on_epoch_end is not None:
                        on_epoch_end(epoch, row)
                self.ddp.barrier()
            if self.ddp.main and self.rows:  # stopped early, or a resumed run with no epoch left
                self.curves.update(pd.DataFrame(self.rows), force=True)
            has_best = (self.run_dir / ckpt.BEST_WEIGHTS).is_file()
            if self.ddp.main and self.cfg.train.oof != "none" and has_best and self.stopped != "time_limit":
                write_oof(self)  # the validation fold predicted by the best weights
        self.ddp.barrier()
        rows = pd.DataFrame(self.rows)
        return FoldResult(self.fold, self.run_dir, self.best["miou"], self.best["epoch"], rows, self.stopped)

    def stop_reason(self, epoch: int) -> str | None:
        """``patience`` (the fold is finished) or ``time_limit`` (to be resumed; rank 0's clock decides)."""
        if patience_spent([r["miou"] for r in self.rows], self.cfg.train.patience):
            return "patience"
        last = self.rows[-1]["seconds"] if self.rows else self.first_epoch_s or 0.0
        late = torch.tensor([self.deadline is not None and time.monotonic() + last > self.deadline])
        if self.ddp.enabled:
            dist.broadcast(late := late.to(self.device), src=0)
        if late.item() and self.ddp.main:
            print(f"fold {self.fold}: train.time_limit leaves no time for epoch {epoch + 1}", flush=True)
        return "time_limit" if late.item() else None

    def epoch(self, model: nn.Module, epoch: int) -> tuple[dict[str, Any], bool]:
        """Train and validate one epoch: its ``metrics.csv`` row, and whether it is the best so far."""
        self.seeded.set_epoch(epoch)
        if self.ddp.enabled:
            self.sampler.set_epoch(epoch)
        self.sampler_gen.manual_seed(self.cfg.train.seed + epoch)
        started = time.perf_counter()
        train_loss = self.train_epoch(model, epoch)
        train_seconds = time.perf_counter() - started
        self.swa.update(self.model, epoch, self.cfg.train.epochs)
        self.epoch_done = epoch
        val_loss, matrix = self.validate()
        images = len(self.train_loader) * self.cfg.train.batch_size * self.ddp.world
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "miou": matrix.miou()}
        row |= {f"iou_{n}": v for n, v in zip(self.names, matrix.iou())}
        row |= {"pixel_acc": matrix.pixel_accuracy(), "lr": self.optimizer.param_groups[0]["lr"]}
        row |= {"seconds": time.perf_counter() - started, "train_img_s": images / train_seconds}
        self.rows.append(row)
        improved = math.isfinite(row["miou"]) and row["miou"] > self.best["miou"]
        improved |= self.cfg.train.keep == "last"
        if improved:
            self.best = {"miou": row["miou"], "epoch": epoch + 1}
        return row, improved


def train_fold(
    cfg: Config,
    fold: int,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    deadline: float | None = None,
    first_epoch_s: float | None = None,
) -> FoldResult:
    """Train fold ``fold`` of ``cfg`` into ``cfg.run_dir(fold)`` and write its out-of-fold predictions.

    ``resume=True`` continues from ``last.ckpt`` (a finished fold is not retrained); without it an existing
    run directory is an error unless ``overwrite``. ``on_epoch_end(epoch, row)`` runs after each epoch's
    files are written (rank 0). ``deadline`` (``time.monotonic()``): no epoch starts that would end after it,
    judged by the last epoch's seconds, or before the fold's first epoch by ``first_epoch_s``.
    """
    return FoldRun(cfg, fold, resume, overwrite, deadline, first_epoch_s).run(on_epoch_end)


def train(
    cfg: Config,
    folds: str | list[int] = "all",
    resume: bool = False,
    overwrite: bool = False,
    started: float | None = None,
    first_epoch_s: float | None = None,
) -> list[FoldResult]:
    """Train the requested folds (``"all"``, ``"0,2"`` or a list) one after the other, recorded as the run's
    folds (``resume.record_folds``), until ``train.time_limit`` from ``started`` (the command's start); one
    result per fold. A fold's first epoch is budgeted as the slowest epoch of the fold before, the first
    fold's as ``first_epoch_s`` (the preflight's). Resumed, a finished fold is reported, not rebuilt."""
    deadline = (started or time.monotonic()) + cfg.train.time_limit if cfg.train.time_limit else None
    results: list[FoldResult] = []
    folds = folds if isinstance(folds, list) else parse_folds(folds, cfg.data.folds)
    try:
        for k in folds:
            done = finished_fold(cfg, k) if resume else None
            if done is not None:
                print(f"fold {k}: finished ({len(done.metrics)} epochs, best mIoU {done.best_miou:.4f})")
            budget = {"deadline": deadline, "first_epoch_s": first_epoch_s}
            results.append(done or train_fold(cfg, k, resume, overwrite, **budget))
            if results[-1].stopped == "time_limit":
                break
            if len(results[-1].metrics):
                first_epoch_s = float(results[-1].metrics["seconds"].max())
    finally:  # once a fold folder exists (even if stopped), the run remembers which folds it is for
        if any(cfg.run_dir(k).is_dir() for k in folds):
            record_folds(cfg, folds)
    return results
