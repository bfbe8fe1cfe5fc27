"""Architectures by name: smp's and ours, one entry point.

``register()`` (run on ``import smp_unet3p``) makes smp itself know ``Unet3Plus``: smp's ``create_model``
looks names up in ``smp.MODEL_ARCHITECTURES_MAPPING`` and ``smp.from_pretrained`` finds the class saved in a
config as an attribute of the ``segmentation_models_pytorch`` module; both are served, idempotently, without
editing smp's files.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

from ._names import did_you_mean
from .decoders.deep_supervision import DEEP_SUPERVISED
from .decoders.unet3plus import Unet3Plus
from .encoders import download_hint, is_local_weights, load_encoder_weights, weights_for

__all__ = [
    "register",
    "create_model",
    "available_architectures",
    "resolve_architecture",
    "check_model_kwargs",
]

OUR_ARCHITECTURES: dict[str, type[nn.Module]] = {"unet3plus": Unet3Plus}


def register() -> None:
    """Add our architectures to smp's name table and module namespace (safe to call twice)."""
    for name, cls in OUR_ARCHITECTURES.items():
        smp.MODEL_ARCHITECTURES_MAPPING[name] = cls
        setattr(smp, cls.__name__, cls)
        architectures = getattr(smp, "_MODEL_ARCHITECTURES", None)
        if isinstance(architectures, list) and cls not in architectures:
            architectures.append(cls)
    for cls in DEEP_SUPERVISED.values():  # smp.from_pretrained finds a saved class by its name
        setattr(smp, cls.__name__, cls)


def available_architectures() -> list[str]:
    """Lower-case names accepted by ``create_model``."""
    return sorted({**smp.MODEL_ARCHITECTURES_MAPPING, **OUR_ARCHITECTURES})


def resolve_architecture(arch: str) -> type[nn.Module]:
    """The model class of an architecture name (case, ``-`` and ``_`` insensitive); an unknown name raises
    ``ValueError`` listing close names and every available one."""
    table = {**smp.MODEL_ARCHITECTURES_MAPPING, **OUR_ARCHITECTURES}
    key = arch.lower().replace("-", "").replace("_", "")
    aliases = {k.replace("_", ""): v for k, v in table.items()}
    if key in aliases:
        return aliases[key]
    hint = did_you_mean(arch, table)
    raise ValueError(f"Unknown architecture {arch!r}.{hint} Available: {', '.join(sorted(table))}")


def model_class(arch: str, kwargs: dict[str, Any]) -> type[nn.Module]:
    """The class ``create_model`` builds: the architecture's, or for smp's ``Unet`` / ``UnetPlusPlus`` given
    ``deep_supervision=True`` their deep-supervised subclass (``decoders.deep_supervision``)."""
    cls = resolve_architecture(arch)
    if cls in DEEP_SUPERVISED and "deep_supervision" in kwargs:
        return DEEP_SUPERVISED[cls]
    return cls


def check_model_kwargs(arch: str, encoder_name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` unless every keyword is a parameter of the architecture's constructor or, with a
    timm (``tu-``) encoder, one the timm model accepts (smp passes the rest to it). smp's own encoders drop
    unknown keywords silently, so a typo or a parameter of another architecture would build another model.
    """
    import inspect

    cls = model_class(arch, kwargs)
    bases = [cls, *(base for base, ds in DEEP_SUPERVISED.items() if ds is cls)]  # a DS class takes smp's too
    own = list(
        dict.fromkeys(
            p
            for c in bases
            for p in inspect.signature(c.__init__).parameters
            if p not in ("self", "kwargs", "args")
        )
    )
    aliases = ("decoder_use_batchnorm",)  # smp's deprecated name, read from kwargs by smp and Unet3Plus
    rest = {k: v for k, v in kwargs.items() if k not in own and k not in aliases}
    if not rest:
        return
    if not encoder_name.startswith("tu-"):
        hints = "".join(did_you_mean(k, own) for k in sorted(rest))
        raise TypeError(
            f"{sorted(rest)} not parameters of {cls.__name__}.{hints} (smp would drop them silently; only "
            f"timm tu- encoders take extra keywords). {cls.__name__} takes: {', '.join(own)}"
        )
    import timm
    import torch

    try:
        with torch.device("meta"):  # builds no weights: only the keywords are checked
            timm.create_model(encoder_name[3:], pretrained=False, features_only=True, **rest)
    except TypeError as exc:
        raise TypeError(
            f"{sorted(rest)}: neither {cls.__name__} ({', '.join(own)}) nor timm's {encoder_name[3:]} takes "
            f"them ({exc})"
        ) from None
    except Exception:  # the model cannot be built this way at all: building it later will say why
        return


def create_model(
    arch: str,
    encoder_name: str = "resnet34",
    encoder_weights: Any = "imagenet",
    in_channels: int = 3,
    classes: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """Build any smp architecture or ``unet3plus`` by name (case, ``-`` and ``_`` insensitive).

    ``deep_supervision`` with ``unet`` / ``unetplusplus`` builds smp's model with side outputs
    (``DSUnet`` / ``DSUnetPlusPlus``). ``encoder_weights`` may also be a local ``.safetensors``/``.pth`` file
    or directory (one file per encoder named after it, or one model file), for every
    architecture (loaded into ``model.encoder`` with strict key/shape checks). Keywords the architecture
    (or a ``tu-`` encoder) does not take are an error (``check_model_kwargs``), never dropped.
    """
    cls = model_class(arch, kwargs)
    check_model_kwargs(arch, encoder_name, kwargs)
    local = is_local_weights(encoder_weights)
    with download_hint(encoder_name, None if local else encoder_weights):
        model = cls(
            encoder_name=encoder_name,
            encoder_weights=None if local and cls is not Unet3Plus else encoder_weights,
            in_channels=in_channels,
            classes=classes,
            **kwargs,
        )
    if local and cls is not Unet3Plus:
        load_encoder_weights(model.encoder, weights_for(encoder_name, encoder_weights))
    return model
