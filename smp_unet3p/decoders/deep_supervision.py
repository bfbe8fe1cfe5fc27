"""Deep supervision for smp's own ``Unet`` and ``UnetPlusPlus`` (smp issues #707, #741, #850).

``DSUnet`` and ``DSUnetPlusPlus`` are smp's models with side heads (3x3 conv to ``classes``, upsampled to the
input size) on intermediate decoder outputs, read with forward hooks, so smp's decoders run unchanged:

- ``Unet``: every decoder block but the last (strides 16, 8, 4, 2 for an encoder of depth 5);
- ``UnetPlusPlus``: the nested outputs of the highest decoder resolution, the paper's X0,1 .. X0,3 (smp's
  blocks ``x_{d}_{depth-1}`` for d = depth-1 .. 1); X0,4, the main path, feeds smp's own head.

In train mode with ``deep_supervision=True`` the model returns the ``Unet3Plus`` train output (``masks``,
``side_masks`` shallow to deep, ``labels`` with ``aux_params``), which ``DeepSupervisionLoss`` consumes; in
eval mode it returns what smp's model returns. ``create_model("unet" | "unetplusplus",
deep_supervision=...)`` and the pipeline's ``model.params.deep_supervision`` build them (``False``: no side
heads, smp's model and outputs exactly).
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DSUnet", "DSUnetPlusPlus", "DEEP_SUPERVISED"]


def _out_channels(module: nn.Module) -> int:
    """Channels a decoder block returns: those of its last convolution."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no convolution in {type(module).__name__}: cannot put a side head on it")
    return convs[-1].out_channels


_TAPPED = "_side_output"  # attribute a tapped module holds its output in, during a supervised forward only


def _record(module: nn.Module, _args: Any, output: torch.Tensor) -> None:
    """Forward hook on a tapped decoder block: keep its output while the owner records (a module-level
    function, not a closure over the model, so that ``copy.deepcopy`` and pickling keep working: the hook
    belongs to whichever copy of the block runs it)."""
    if _TAPPED in module.__dict__:
        module.__dict__[_TAPPED] = output


class _SideOutputs:
    """Side heads on ``self._taps()``'s modules; their outputs are recorded by forward hooks only while a
    supervised forward runs (eval mode, export and compile see smp's model)."""

    def _add_side_heads(self, deep_supervision: bool, classes: int) -> None:
        self.deep_supervision = deep_supervision
        self.side_heads = None
        if not deep_supervision:
            return
        taps = self._taps()
        self.side_heads = nn.ModuleList(nn.Conv2d(_out_channels(m), classes, 3, padding=1) for m in taps)
        for module in taps:
            module.register_forward_hook(_record)
        from segmentation_models_pytorch.base import initialization as init

        init.initialize_head(self.side_heads)

    def _taps(self) -> list[nn.Module]:  # pragma: no cover - each model defines it
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Any:
        if not (self.training and self.side_heads is not None):
            return super().forward(x)
        taps = self._taps()
        for module in taps:
            module.__dict__[_TAPPED] = None
        try:
            out = super().forward(x)
            features = [module.__dict__[_TAPPED] for module in taps]
        finally:
            for module in taps:
                module.__dict__.pop(_TAPPED, None)
        masks, labels = out if isinstance(out, tuple) else (out, None)
        size = x.shape[-2:]
        side = [
            F.interpolate(head(f), size=size, mode="bilinear", align_corners=False)
            for head, f in zip(self.side_heads, features)
        ]
        result = {"masks": masks, "side_masks": side}
        return result if labels is None else {**result, "labels": labels}


class DSUnet(_SideOutputs, smp.Unet):
    """smp ``Unet`` with optional deep supervision (side heads on every decoder block but the last).

    Args: those of ``smp.Unet`` (by keyword after ``encoder_name``), and ``deep_supervision``: return side
    outputs in train mode.
    """

    def __init__(self, encoder_name: str = "resnet34", deep_supervision: bool = False, **kwargs: Any):
        super().__init__(encoder_name=encoder_name, **kwargs)
        self._add_side_heads(deep_supervision, self.segmentation_head[0].out_channels)

    def _taps(self) -> list[nn.Module]:
        return list(self.decoder.blocks)[:-1][::-1]  # shallow to deep


class DSUnetPlusPlus(_SideOutputs, smp.UnetPlusPlus):
    """smp ``UnetPlusPlus`` with optional deep supervision over its nested full-resolution outputs (the
    paper's X0,1 .. X0,3 beside the main X0,4).

    Args: those of ``smp.UnetPlusPlus`` (by keyword after ``encoder_name``), and ``deep_supervision``:
    return side outputs in train mode.
    """

    def __init__(self, encoder_name: str = "resnet34", deep_supervision: bool = False, **kwargs: Any):
        super().__init__(encoder_name=encoder_name, **kwargs)
        self._add_side_heads(deep_supervision, self.segmentation_head[0].out_channels)

    def _taps(self) -> list[nn.Module]:
        depth = self.decoder.depth
        return [self.decoder.blocks[f"x_{d}_{depth - 1}"] for d in range(depth - 1, 0, -1)]


# smp class -> its deep-supervised subclass (create_model picks it when deep_supervision is given)
DEEP_SUPERVISED: dict[type[nn.Module], type[nn.Module]] = {smp.Unet: DSUnet, smp.UnetPlusPlus: DSUnetPlusPlus}
