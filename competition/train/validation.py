"""The validation loop: loss and confusion matrix of a loader, each batch's probabilities to a callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..core import checkpoint as ckpt
from ..core.config import Config
from ..core.metrics import ConfusionMatrix
from ..core.runtime import (
    autocast,
    batch_to_device,
    collate,
    eval_outputs,
    output_stride,
    pad_to_multiple,
    to_probs,
)
from ..predictions.oof import OOF_FILE, OofWriter


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
    """Mean validation loss (on ungated logits) and the confusion matrix of the whole loader (summed over
    DDP ranks when ``all_reduce``). ``on_batch(batch, probs)`` sees each batch's probabilities. Images of
    any size are mirror-padded to the encoder's output stride (the padding's labels ignored) and the
    predictions cropped back, as ``predict`` does."""
    model.eval()
    matrix = ConfusionMatrix(classes, cfg.loss.ignore_index, device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    stride = output_stride(model)
    for batch in loader:
        images, masks = batch_to_device(batch, device, cfg.train.channels_last)
        images, (h, w) = pad_to_multiple(images, stride)  # any image size: padded, and cropped back
        padded = F.pad(masks, (0, images.shape[-1] - w, 0, images.shape[-2] - h), value=cfg.loss.ignore_index)
        with autocast(device, cfg.train.amp):
            loss_output, logits = eval_outputs(model, images)
            loss = criterion(loss_output, padded)
        logits = logits[..., :h, :w]
        loss_sum += torch.stack([loss.double() * len(images), loss_sum.new_tensor(len(images))])
        probs = to_probs(logits, classes)
        matrix.update(probs.argmax(1), masks)
        if on_batch is not None:
            on_batch(batch, probs)
    if all_reduce and dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        matrix.all_reduce()
    return float(loss_sum[0] / loss_sum[1].clamp(min=1)), matrix


def write_oof(run: Any) -> float | None:
    """A ``train.FoldRun``'s validation fold predicted by its best weights into ``oof.npz`` (``oof``);
    returns their mIoU. A finished fold resumed with nothing left to train keeps its file (``None``)."""
    if len(run.rows) == run.start_epoch and (run.run_dir / OOF_FILE).is_file():
        return None
    cfg = run.cfg
    model, _, _ = ckpt.load_fold_model(run.run_dir, run.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        run.val_set, batch_size=run.val_batch, collate_fn=collate, num_workers=cfg.train.workers
    )
    args = (cfg.train.oof, cfg.train.oof_size, run.names, run.fold, cfg.loss.ignore_index)
    with OofWriter(run.run_dir / OOF_FILE, *args, {"run": cfg.name, **run.origin}) as writer:
        _, matrix = evaluate(
            model, loader, run.criterion, len(run.names), run.device, cfg, writer.add, all_reduce=False
        )
    return matrix.miou()
