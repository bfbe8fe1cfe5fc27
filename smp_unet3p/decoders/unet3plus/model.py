from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import ClassificationHead, SegmentationHead, SegmentationModel
from segmentation_models_pytorch.base import modules as md
from segmentation_models_pytorch.base.hub_mixin import supports_config_loading
from segmentation_models_pytorch.base.utils import is_torch_compiling
from torch import nn

from ...encoders import get_encoder
from ...modules.cgm import ClassificationGuidedModule, gate_logits
from .decoder import FullResolutionBlock, Unet3PlusDecoder


class Unet3PlusTrainOutput(TypedDict, total=False):
    """What ``Unet3Plus`` returns in train mode when ``deep_supervision`` or ``cgm`` is on.

    - ``masks``: ``[B, classes, H, W]`` logits of the main head (not CGM-gated, so every class gets a
      segmentation gradient; gating is applied in eval mode).
    - ``side_masks``: deep-supervision logits, each ``[B, classes, H, W]`` (upsampled to input size), shallow
      to deep: decoder stages ``X_2 .. X_{D-1}`` then the deepest encoder map ``E_D`` (``D - 1`` tensors).
    - ``presence``: CGM presence logits ``[B, classes]`` (multi-label, sigmoid).
    - ``labels``: output of smp's classification head when ``aux_params`` is given.
    """

    masks: torch.Tensor
    side_masks: list[torch.Tensor]
    presence: torch.Tensor
    labels: torch.Tensor


class Unet3Plus(SegmentationModel):
    """UNet 3+ (Huang et al., 2020, arXiv:2004.08790) on any smp or timm encoder.

    Full-scale skip connections: every decoder stage fuses all encoder and deeper decoder scales, optional
    full-scale deep supervision, and a classification-guided module (CGM) extended to multi-class presence
    gating.

    Args:
        encoder_name: smp encoder (``resnet34``, ``efficientnet-b0``, ``mit_b0`` ...) or timm via ``tu-``.
        encoder_depth: number of encoder stages, 3..5.
        encoder_weights: ``None``, a pretrained tag (``"imagenet"``; ``True`` for ``tu-``), or a local
            ``.safetensors``/``.pth`` file or directory (offline; see ``smp_unet3p.encoders``).
        decoder_cat_channels: channels of each full-scale branch (64 in the paper); a stage has
            ``encoder_depth * decoder_cat_channels`` channels.
        decoder_use_norm: normalisation in the decoder, as smp's ``decoder_use_norm``.
        decoder_interpolation: upsampling mode of the decoder branches, the side outputs and the main
            head (its logits are at stride 2); ``align_corners=False`` everywhere.
        decoder_upsample_after_conv: run each upsampling branch's 3x3 conv at the coarse source resolution,
            then upsample (default; much cheaper). ``False``: the paper's order, upsample then conv. Same
            weights either way, so checkpoints load into both. Measured (docs/study.md, synthetic
            11-class, lite0, 8 epochs, 3 seeds): the paper's order scored +0.000 ± 0.014 held-out mIoU
            against this order, at 1.8x the training time: within noise, so the fast order is the default.
        decoder_full_res_channels: ``None`` (default): the head makes logits from the stride-2 stage and
            they are upsampled. An int N adds a ``FullResolutionBlock`` of N channels that decodes to input
            resolution first (the paper's encoder has a stride-1 stage, smp encoders do not). Measured
            (docs/study.md): +0.007 ± 0.015 mIoU on ISBI membranes, but 0.32 vs 0.82 on the multi-class
            synthetic set at a short budget, so it is off by default.
        in_channels: input channels.
        classes: output channels. With ``classes > 1`` class ``cgm_background`` is background (never
            CGM-gated).
        activation: activation on the eval output (``"sigmoid"``, ``"softmax"`` ... or ``None`` for logits).
        deep_supervision: in train mode also return side outputs (see ``Unet3PlusTrainOutput``).
        cgm: add the classification-guided module (presence head on the deepest encoder map).
        cgm_dropout: dropout before the CGM's 1x1 conv.
        cgm_gate: ``"soft"`` (default: logits + log presence probability) or ``"hard"`` (the paper's: a
            class whose presence is below ``cgm_threshold`` is removed) gating in eval mode. Measured
            (docs/study.md): with a pretrained encoder hard is never better (soft 0.825, hard 0.813 held-out
            mIoU); from scratch, hard gating kept the demo at the all-background level for 15 epochs
            (0.09 vs 0.45 mIoU), so soft is the default.
        cgm_threshold: presence threshold of the hard gate.
        cgm_background: the class CGM never gates (default 0); ``None`` gates every class (data without a
            background class).
        aux_params: smp's classification head (``classes``, ``pooling``, ``dropout``, ``activation``).
        decoder_attention_type: ``None`` or ``"scse"``: smp's attention block on each stage's concatenated
            branches and on its fused output (as smp's Unet applies it around each decoder block).
        kwargs: passed to a timm (``tu-``) encoder's constructor. smp's deprecated ``decoder_use_batchnorm``
            is read as ``decoder_use_norm``; ``decoder_channels`` (smp's Unet) is refused, pointing at
            ``decoder_cat_channels``; any other keyword with an smp encoder is an error, never dropped.

    Returns:
        eval mode: ``[B, classes, H, W]`` (``(masks, labels)`` with ``aux_params``), like every smp model;
        train mode: the same, or a ``Unet3PlusTrainOutput`` dict when ``deep_supervision`` or ``cgm`` is on.
    """

    # the train-mode dict output and the CGM branches are not TorchScript-able; export/compile are
    _is_torch_scriptable = False
    _is_torch_exportable = True
    _is_torch_compilable = True
    requires_divisible_input_shape = True

    @supports_config_loading
    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: str | bool | None = "imagenet",
        decoder_cat_channels: int = 64,
        decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
        decoder_interpolation: str = "bilinear",
        decoder_upsample_after_conv: bool = True,
        decoder_full_res_channels: int | None = None,
        decoder_attention_type: str | None = None,
        in_channels: int = 3,
        classes: int = 1,
        activation: str | Callable | None = None,
        deep_supervision: bool = False,
        cgm: bool = False,
        cgm_dropout: float = 0.5,
        cgm_gate: str = "soft",
        cgm_threshold: float = 0.5,
        cgm_background: int | None = 0,
        aux_params: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        decoder_use_norm = _smp_style_arguments(kwargs, encoder_name, decoder_use_norm)
        if classes < 1:
            raise ValueError(f"classes must be >= 1, got {classes}")
        if cgm_gate not in ("hard", "soft"):
            raise ValueError(f"cgm_gate must be 'hard' or 'soft', got {cgm_gate!r}")
        if cgm_background is not None and not 0 <= cgm_background < classes:
            raise ValueError(f"cgm_background must be None or a class id in [0, {classes}): {cgm_background}")

        self.encoder = get_encoder(
            encoder_name, in_channels=in_channels, depth=encoder_depth, weights=encoder_weights, **kwargs
        )
        self.decoder = Unet3PlusDecoder(
            encoder_channels=self.encoder.out_channels,
            encoder_depth=encoder_depth,
            cat_channels=decoder_cat_channels,
            use_norm=decoder_use_norm,
            interpolation_mode=decoder_interpolation,
            upsample_after_conv=decoder_upsample_after_conv,
            attention_type=decoder_attention_type,
        )
        # decoder output is at stride 2: a full-resolution block decodes it to input size, or raw_outputs
        # upsamples the head's logits with the same interpolation as the side outputs (align_corners=False)
        self.full_res = (
            FullResolutionBlock(
                self.decoder.out_channels, decoder_full_res_channels, decoder_use_norm, decoder_interpolation
            )
            if decoder_full_res_channels
            else None
        )
        self.segmentation_head = SegmentationHead(
            decoder_full_res_channels or self.decoder.out_channels, classes, kernel_size=3, upsampling=1
        )
        self.activation = md.Activation(activation)
        self.deep_supervision = deep_supervision
        self.side_heads = (
            nn.ModuleList(
                nn.Conv2d(ch, classes, kernel_size=3, padding=1) for ch in self.decoder.stage_channels[1:]
            )
            if deep_supervision
            else None
        )
        self.interpolation_mode = decoder_interpolation
        self.cgm = (
            ClassificationGuidedModule(self.encoder.out_channels[-1], classes, cgm_dropout) if cgm else None
        )
        self.cgm_gate = cgm_gate
        self.cgm_threshold = cgm_threshold
        self.cgm_background = cgm_background
        self.classification_head = (
            ClassificationHead(in_channels=self.encoder.out_channels[-1], **aux_params)
            if aux_params is not None
            else None
        )
        self.name = f"unet3plus-{encoder_name}"
        self.initialize()

    def initialize(self) -> None:
        super().initialize()
        from segmentation_models_pytorch.base import initialization as init

        for head in (self.side_heads, self.cgm):
            if head is not None:
                init.initialize_head(head)
        if self.full_res is not None:
            init.initialize_decoder(self.full_res)

    def _upsample(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        align = False if self.interpolation_mode in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=size, mode=self.interpolation_mode, align_corners=align)

    def raw_outputs(self, x: torch.Tensor) -> Unet3PlusTrainOutput:
        """Every head's output before CGM gating and activation, in any mode: ``masks`` (ungated logits),
        ``presence`` and ``labels`` when those heads exist, ``side_masks`` in train mode with deep
        supervision. Validation losses use this (a gated logit is offset by -1e4); ``finalize`` turns it
        into the eval output.
        """
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(x)

        features = self.encoder(x)
        stages = self.decoder(features)
        size = (x.shape[-2], x.shape[-1])
        if self.full_res is not None:
            masks = self.segmentation_head(self.full_res(stages[0], size))
        else:
            masks = self._upsample(self.segmentation_head(stages[0]), size)
        out: Unet3PlusTrainOutput = {"masks": masks}
        if self.training and self.side_heads is not None:
            out["side_masks"] = [
                self._upsample(head(f), size) for head, f in zip(self.side_heads, stages[1:])
            ]
        if self.cgm is not None:
            out["presence"] = self.cgm(features[-1])
        if self.classification_head is not None:
            out["labels"] = self.classification_head(features[-1])
        return out

    def finalize(self, out: Unet3PlusTrainOutput):
        """The eval output of ``raw_outputs``: CGM-gated masks, then ``activation`` (+ ``labels``)."""
        masks = out["masks"]
        if "presence" in out:
            gate = (self.cgm_gate, self.cgm_threshold, self.cgm_background)
            masks = gate_logits(masks, out["presence"], *gate)
        masks = self.activation(masks)
        if "labels" in out:
            return masks, out["labels"]
        return masks

    def forward(self, x: torch.Tensor):
        out = self.raw_outputs(x)
        if self.training and (self.side_heads is not None or self.cgm is not None):
            return out
        return self.finalize(out)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "Unet3Plus does not support TorchScript (torch.jit.script): its train-mode dict output and CGM "
            "branches are not scriptable. Use torch.export or torch.compile (both tested), or ONNX export"
        )

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any):
        # the saved weights replace the encoder's: never fetch (or look for) the original encoder weights
        kwargs["encoder_weights"] = None
        return super()._from_pretrained(model_id=model_id, **kwargs)


def _smp_style_arguments(kwargs: dict[str, Any], encoder_name: str, use_norm: Any) -> Any:
    """Read smp's keyword arguments that ``Unet3Plus`` does not take by name out of ``kwargs`` (in place);
    returns ``decoder_use_norm``. What stays in ``kwargs`` goes to a timm encoder; with an smp encoder it
    would be dropped, so it is an error."""
    import inspect
    import warnings

    from ..._names import did_you_mean

    if "decoder_channels" in kwargs:
        raise ValueError(
            "Unet3Plus has no decoder_channels: every stage has encoder_depth * decoder_cat_channels "
            f"channels (got decoder_channels={kwargs['decoder_channels']!r}); set decoder_cat_channels "
            "(64 in the paper, 32 is a light setting)"
        )
    batchnorm = kwargs.pop("decoder_use_batchnorm", None)
    if batchnorm is not None:
        warnings.warn(
            "decoder_use_batchnorm is deprecated (as in smp); use decoder_use_norm", DeprecationWarning, 3
        )
        use_norm = batchnorm
    if kwargs and not encoder_name.startswith("tu-"):
        known = [p for p in inspect.signature(Unet3Plus.__init__).parameters if p not in ("self", "kwargs")]
        hints = "".join(did_you_mean(k, known) for k in sorted(kwargs))
        raise TypeError(
            f"Unet3Plus got unexpected keyword argument(s) {sorted(kwargs)}.{hints} Only timm (tu-) encoders "
            f"take extra keywords; encoder {encoder_name!r} would ignore them"
        )
    return use_norm
