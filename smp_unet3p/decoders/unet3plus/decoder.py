"""UNet 3+ decoder: every decoder stage fuses all scales (Huang et al., 2020, arXiv:2004.08790).

With encoder maps ``E1..ED`` (strides 2 .. 2**D; ``E0``, the input, is not used) the decoder builds
``X_i`` for ``i = D-1 .. 1`` from one branch per scale:

- shallower encoder maps ``E_j`` (``j < i``): max-pooled by ``2**(i-j)``;
- the same-scale encoder map ``E_i``;
- deeper decoder maps ``X_j`` (``i < j < D``) and the deepest encoder map ``E_D``: upsampled by ``2**(j-i)``;

each branch is a 3x3 conv to ``cat_channels`` (+ norm + ReLU), the branches are concatenated
(``D * cat_channels`` channels; 5 x 64 = 320 in the paper) and fused by a 3x3 conv (+ norm + ReLU).

``upsample_after_conv=True`` (default) runs an upsampling branch's conv at the source's own (coarse)
resolution and upsamples its ``cat_channels`` output; the paper upsamples the wide source map first and
convolves at the fine resolution (``False``). The weights are the same shapes either way, but upsampling
first costs up to ``4**(j-i)`` times the branch FLOPs and memory: on a 5-stage encoder the ``E_5`` branch
of the stride-2 stage convolves a 16x-upsampled 512-channel map (see docs/benchmarks.md).
Encoder stages that report 0 channels (ConvNeXt / MiT have no stride-2 feature) simply contribute no branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import modules as md
from torch import nn


class FullScaleBranch(nn.Module):
    """Resample a feature map to the target scale, then 3x3 conv + norm + ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale_log2: int,
        use_norm: bool | str | dict[str, Any] = "batchnorm",
        interpolation_mode: str = "bilinear",
        upsample_after_conv: bool = True,
    ):
        super().__init__()
        # scale_log2 > 0: source is finer (pool down); < 0: coarser (upsample); 0: same scale
        self.pool = 2**scale_log2 if scale_log2 > 0 else 1
        self.upsample = scale_log2 < 0
        self.upsample_after_conv = upsample_after_conv
        self.interpolation_mode = interpolation_mode
        self.conv = md.Conv2dReLU(in_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        align = False if self.interpolation_mode in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=size, mode=self.interpolation_mode, align_corners=align)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.pool > 1:
            x = F.max_pool2d(x, kernel_size=self.pool, stride=self.pool, ceil_mode=True)
        if not self.upsample:
            return self.conv(x)
        if self.upsample_after_conv:
            return self._resize(self.conv(x), size)
        return self.conv(self._resize(x, size))


class FullScaleStage(nn.Module):
    """One decoder stage: branches from every scale, concatenated and fused."""

    def __init__(
        self,
        sources: Sequence[tuple[int, int]],
        level: int,
        cat_channels: int,
        out_channels: int,
        use_norm: bool | str | dict[str, Any],
        interpolation_mode: str,
        upsample_after_conv: bool = True,
        attention_type: str | None = None,
    ):
        super().__init__()
        # sources: (source level, channels) in the order the forward pass hands them over
        self.branches = nn.ModuleList(
            FullScaleBranch(ch, cat_channels, level - src, use_norm, interpolation_mode, upsample_after_conv)
            for src, ch in sources
        )
        self.fuse = md.Conv2dReLU(
            cat_channels * len(sources), out_channels, kernel_size=3, padding=1, use_norm=use_norm
        )
        # smp's attention (identity for None): on the concatenated branches and on the fused output
        self.attention1 = md.Attention(attention_type, in_channels=cat_channels * len(sources))
        self.attention2 = md.Attention(attention_type, in_channels=out_channels)

    def forward(self, inputs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = torch.cat([branch(x, size) for branch, x in zip(self.branches, inputs)], dim=1)
        return self.attention2(self.fuse(self.attention1(x)))


class FullResolutionBlock(nn.Module):
    """Decode the stride-2 stage ``X_1`` to input resolution: 1x1 conv to ``2 * channels``, upsample by 2,
    two 3x3 convs to ``channels`` (as smp Unet's last decoder block). The paper's encoder has a stride-1
    stage; smp encoders start at stride 2, so without this block the logits are made at stride 2."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        use_norm: bool | str | dict[str, Any] = "batchnorm",
        interpolation_mode: str = "bilinear",
    ):
        super().__init__()
        self.reduce = md.Conv2dReLU(in_channels, 2 * channels, kernel_size=1, use_norm=use_norm)
        self.conv1 = md.Conv2dReLU(2 * channels, channels, kernel_size=3, padding=1, use_norm=use_norm)
        self.conv2 = md.Conv2dReLU(channels, channels, kernel_size=3, padding=1, use_norm=use_norm)
        self.interpolation_mode = interpolation_mode

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        align = False if self.interpolation_mode in ("bilinear", "bicubic") else None
        x = F.interpolate(self.reduce(x), size=size, mode=self.interpolation_mode, align_corners=align)
        return self.conv2(self.conv1(x))


class Unet3PlusDecoder(nn.Module):
    """Full-scale skip decoder.

    Args:
        encoder_channels: ``encoder.out_channels`` (index 0 is the input and is ignored).
        encoder_depth: number of encoder stages used (3..5).
        cat_channels: channels of every branch (64 in the paper).
        use_norm: normalisation after each conv, as in smp (``"batchnorm"``, ``True``, a dict ...).
        interpolation_mode: mode of the upsampling branches (``"bilinear"`` in the paper).
        upsample_after_conv: convolve deeper maps at their own resolution, then upsample (fast, default);
            ``False`` is the paper's order (upsample, then convolve).
        attention_type: ``None`` or ``"scse"`` (smp's attention block around each stage's fusion).

    Forward returns the stage outputs shallow to deep: ``[X_1, ..., X_{D-1}, E_D]``; ``X_1`` (stride 2) feeds
    the segmentation head, the rest feed the deep-supervision heads.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_depth: int = 5,
        cat_channels: int = 64,
        use_norm: bool | str | dict[str, Any] = "batchnorm",
        interpolation_mode: str = "bilinear",
        upsample_after_conv: bool = True,
        attention_type: str | None = None,
    ):
        super().__init__()
        if not 3 <= encoder_depth <= 5:
            raise ValueError(f"Unet3Plus supports encoder_depth 3, 4 or 5, got {encoder_depth}")
        if cat_channels < 1:
            raise ValueError(f"decoder_cat_channels must be positive, got {cat_channels}")
        channels = list(encoder_channels)[1 : encoder_depth + 1]
        if len(channels) != encoder_depth:
            raise ValueError(
                f"encoder reports {len(channels)} stages, expected {encoder_depth}: {list(encoder_channels)}"
            )
        self.depth = encoder_depth
        self.out_channels = cat_channels * encoder_depth
        # stage-level channels, level 1 = stride 2; 0 channels = no feature at that stride
        self.encoder_level_channels = channels

        stages = []
        self.stage_sources: list[list[tuple[str, int]]] = []
        for level in range(encoder_depth - 1, 0, -1):
            sources: list[tuple[str, int]] = []  # ("enc"|"dec", level)
            branch_specs: list[tuple[int, int]] = []
            for src in range(1, level + 1):  # shallower and same-scale encoder maps
                if channels[src - 1] > 0:
                    sources.append(("enc", src))
                    branch_specs.append((src, channels[src - 1]))
            for src in range(level + 1, encoder_depth):  # deeper decoder maps
                sources.append(("dec", src))
                branch_specs.append((src, self.out_channels))
            sources.append(("enc", encoder_depth))  # deepest encoder map
            branch_specs.append((encoder_depth, channels[-1]))
            stages.append(
                FullScaleStage(
                    branch_specs,
                    level,
                    cat_channels,
                    self.out_channels,
                    use_norm,
                    interpolation_mode,
                    upsample_after_conv,
                    attention_type,
                )
            )
            self.stage_sources.append(sources)
        self.stages = nn.ModuleList(stages)
        self.stage_levels = list(range(encoder_depth - 1, 0, -1))

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the forward outputs, shallow to deep."""
        return [self.out_channels] * (self.depth - 1) + [self.encoder_level_channels[-1]]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        encoder = features[1 : self.depth + 1]
        decoded: dict[int, torch.Tensor] = {}
        for stage, level, sources in zip(self.stages, self.stage_levels, self.stage_sources):
            target = encoder[level - 1]
            size = (target.shape[-2], target.shape[-1])
            inputs = [encoder[src - 1] if kind == "enc" else decoded[src] for kind, src in sources]
            decoded[level] = stage(inputs, size)
        return [decoded[level] for level in range(1, self.depth)] + [encoder[-1]]
