"""What every stage shares: the device and this process's DDP place, autocast, batching, the model of a
config, and the output contract.

**The output contract.** A model in eval mode returns logits ``[B, C, H, W]`` at input size (smp's
``(masks, labels)`` tuple with ``aux_params``). ``to_probs`` is the one place logits become probabilities:
softmax over classes for ``C > 1``; for a 1-channel model sigmoid, returned as ``[1 - p, p]`` so a
probability map always has one channel per class name (background first) and its argmax is the class.
Validation, out-of-fold files, prediction and ensembling all go through it; model parameters that would make
eval return probabilities already (``activation``) are refused when the config loads.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data._utils.collate import default_collate

from smp_unet3p import create_model

from .config import Config, ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available) or any torch device name."""
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

    def any(self, flag: torch.Tensor) -> bool:
        """True when ``flag`` (a bool tensor) is true on any rank: every rank takes the same decision."""
        if not self.enabled:
            return bool(flag)
        value = flag.to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)


_FREE_CORES: list[int] = []  # decided once per process: later folds would count this run's own load


def cpu_threads(requested: int | None, workers: int) -> int:
    """torch's CPU threads for a run: ``requested``; else ``OMP_NUM_THREADS`` when set (torchrun sets 1);
    else the cores this process may use, less one per DataLoader worker and less the cores other processes
    keep busy (``busy_cores``), judged once per process: oversubscribed OpenMP threads on a shared machine
    can be several times slower (6x seen on 2 busy cores)."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if not _FREE_CORES:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _FREE_CORES.append(max(1, min(cores, int(cores - busy_cores() + 0.5))))
    return max(1, _FREE_CORES[0] - workers)


def stage_threads(workers: int = 0, requested: int | None = None) -> int:
    """Set and return torch's CPU threads for a stage, chosen as ``train`` chooses them (``cpu_threads``):
    inference with DataLoader workers on a busy 2-core machine is slower oversubscribed (26.6 s vs 17.8 s
    for 20 CamVid frames)."""
    threads = cpu_threads(requested, workers)
    torch.set_num_threads(threads)
    return threads


def busy_cores(interval: float = 0.25) -> float:
    """How many cores other processes keep busy now: the machine's busy share of ``/proc/stat`` over
    ``interval`` seconds while this process sleeps (Linux); elsewhere the 1-minute load average less this
    process. (The load average trails by a minute or more: just after another job ends it still counts it,
    and a run started then would take half the threads it could.)"""
    try:
        first = cpu_ticks()
        time.sleep(interval)
        second = cpu_ticks()
    except (OSError, ValueError):
        return max(0.0, (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0) - 1.0)
    busy, total = second[1] - first[1], second[2] - first[2]
    return first[0] * busy / total if total > 0 else 0.0


def cpu_ticks(path: str = "/proc/stat") -> tuple[int, int, int]:
    """``(cpus, busy ticks, total ticks)`` of the machine since boot, from ``/proc/stat``'s first line (user
    nice system idle iowait irq softirq steal; idle and iowait are not busy)."""
    with open(path) as f:
        lines = f.read().splitlines()
    ticks = [int(v) for v in lines[0].split()[1:9]]
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return cpus, sum(ticks) - ticks[3] - ticks[4], sum(ticks)


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


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in ``bf16`` / ``fp16``; nothing for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` with a clear error for images of different sizes in one batch."""
    sizes = {tuple(b["image"].shape[-2:]) for b in batch}
    if len(sizes) > 1:
        raise ValueError(
            f"images of different sizes {sorted(sizes)} in one batch ({[b['file_name'] for b in batch]}); "
            "set augment.size (training crop) and augment.eval_size (validation resize), or batch size 1"
        )
    return default_collate(batch)


def batch_to_device(
    batch: dict[str, Any], device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (optionally channels_last) and masks of a batch on ``device``."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["mask"].to(device, non_blocking=True)


def sample_id(value: Any) -> str:
    """A batch's ``image_id`` entry as the string used in every file we write."""
    return str(value.item() if torch.is_tensor(value) else value)


def main_logits(output: Any) -> torch.Tensor:
    """The mask logits of any model output (tensor, smp ``(masks, labels)`` tuple or our train dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output["masks"]


def to_probs(output: Any, classes: int | None = None) -> torch.Tensor:
    """Class probabilities ``[B, classes, H, W]`` (float32) of any model output's logits (module docstring).

    ``classes`` (optional) is checked against the model's channels: ``C`` or, for a 1-channel model, 2.
    """
    logits = main_logits(output).float()
    if logits.shape[1] == 1:
        p = logits.sigmoid()
        probs = torch.cat([1.0 - p, p], dim=1)
    else:
        probs = logits.softmax(1)
    if classes is not None and probs.shape[1] != classes:
        raise ValueError(f"the model outputs {logits.shape[1]} channels for {classes} classes")
    return probs


def output_stride(model: nn.Module) -> int:
    """What a model's input sides must divide by: its encoder's output stride (32 without an encoder)."""
    return int(getattr(getattr(unwrap(model), "encoder", None), "output_stride", 32))


def padded_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """``(height, width)`` rounded up to ``multiple``: the size ``pad_to_multiple`` pads to."""
    return size[0] + (-size[0]) % multiple, size[1] + (-size[1]) % multiple


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Mirror-pad bottom/right so H and W divide by ``multiple`` (a model's output stride); returns the
    original size for cropping."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def eval_outputs(model: nn.Module, images: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """``(loss output, logits)`` of an eval-mode forward.

    The logits are the model's eval output (CGM-gated for ``Unet3Plus``): what inference predicts. The loss
    output holds the ungated main logits (and CGM presence) for the validation loss: a gated logit of an
    absent class is offset by -1e4, which would make the loss meaningless.
    """
    raw = getattr(model, "raw_outputs", None)
    if raw is None:
        output = model(images)
        return output, main_logits(output)
    outputs = raw(images)
    return outputs, main_logits(model.finalize(outputs))


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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_weights(weights: Any, source: str = "ensemble weights") -> np.ndarray:
    """``weights`` (per member ``[members]``, or per member and class ``[members, classes]``) as float64,
    refused unless every one is a finite number >= 0 and the members' weights of every class sum to more
    than 0 (NaN slips through ``w < 0`` and ``sum <= 0`` alike). ``source`` names where they came from (a
    file, a flag) in the error."""
    w = np.asarray(weights, dtype=np.float64)
    problem = (
        "are not numbers" if w.ndim not in (1, 2) or not w.size
        else "include NaN or infinity" if not np.isfinite(w).all()
        else "include negative values" if (w < 0).any()
        else "are all zero" + (" for some class" if w.ndim == 2 else "") if (w.sum(0) <= 0).any()
        else None
    )  # fmt: skip
    if problem:
        raise ValueError(
            f"{source}: the weights {problem} ({w.tolist()}); weights must be finite, >= 0 and not all zero"
        )
    return w


def normalize_weights(
    weights: Sequence[float] | None, count: int, source: str = "ensemble weights"
) -> np.ndarray:
    """Ensemble weights for ``count`` members (``None``: equal), checked (``check_weights``) and scaled to
    sum 1."""
    w = np.ones(count) if weights is None else check_weights(weights, source)
    if w.ndim != 1 or len(w) != count:
        raise ValueError(f"{source}: {len(w)} weights for {count} ensemble members")
    return w / w.sum()
