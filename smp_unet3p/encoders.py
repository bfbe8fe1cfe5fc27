"""Encoders by name with offline-first pretrained weights.

``encoder_weights`` may be what smp accepts (``None``, ``"imagenet"``, ``True`` for ``tu-`` encoders) or a
local file / directory holding a state dict (``.safetensors``, ``.pth``, ``.pt``, ``.bin``). A directory may
hold one file per encoder, named after it (``tu-efficientnet_lite1.pth`` or ``efficientnet_lite1.pth``, as a
Kaggle dataset of weights does), so one path serves every encoder a sweep or an ensemble tries; otherwise
its one ``model.safetensors`` (or ``encoder.safetensors``, ``pytorch_model.bin``, ``model.pth``) is read.
Local files are read without executing pickled code (safetensors, or ``torch.load(weights_only=True)``).

Key matching (``load_encoder_weights``):

- ``"by_name"``: keys are matched by name after stripping wrapper prefixes (``module.``, ``encoder.``,
  ``model.``). Keys of a classifier head the encoder does not have (``fc.*``, ``classifier.*``,
  ``conv_head.*`` ...) are dropped; any other missing or unexpected key is an error that lists them.
- ``"by_order"``: for checkpoints saved by another implementation of the same network (e.g. the
  efficientnet-pytorch layout ``_conv_stem``, ``_blocks.N...`` for timm's ``efficientnet_lite0``): the i-th
  tensor of the file goes to the i-th tensor of the reference network (for ``tu-`` encoders the full timm
  model, head included), and every pair must have the same shape.
- ``"auto"`` (default): ``by_name`` when any key matches by name, else ``by_order``.

A first convolution saved for 3 input channels is adapted to the encoder's ``in_channels`` (timm's
``adapt_input_conv``), so local weights work for 1- or 4-channel inputs too.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

__all__ = [
    "get_encoder",
    "is_local_weights",
    "load_encoder_weights",
    "read_state_dict",
    "EncoderWeightsError",
]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_DIR_CANDIDATES = ("model.safetensors", "encoder.safetensors", "pytorch_model.bin", "model.pth")
_WRAPPER_PREFIXES = ("module.", "encoder.", "model.")


class EncoderWeightsError(RuntimeError):
    """Local encoder weights that cannot be loaded into the encoder (bad keys, shapes or file)."""


def is_local_weights(weights: Any) -> bool:
    """True when ``weights`` names a local file or directory rather than a pretrained tag."""
    if not isinstance(weights, (str, os.PathLike)):
        return False
    text = os.fspath(weights)
    return text.lower().endswith(WEIGHT_SUFFIXES) or os.sep in text or Path(text).exists()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a tensor dict from a safetensors / torch file (or a directory holding one), safely."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in _DIR_CANDIDATES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"No weights file in directory {path}; expected one named after the encoder "
                f"(<encoder_name>.safetensors or .pth) or one of {', '.join(_DIR_CANDIDATES)}"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"Encoder weights file not found: {path}. Pass encoder_weights=<path to a .safetensors or "
            f".pth file>, None for random initialisation, or a pretrained tag such as 'imagenet'."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, truncated download ...
        raise EncoderWeightsError(f"Cannot read encoder weights from {path}: {exc}") from exc
    # unwrap common training-checkpoint containers
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderWeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _strip_wrappers(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes until names line up with the target (or nothing more can be stripped)."""
    if any(k.startswith("encoder.") for k in state) and not all(k.startswith("encoder.") for k in state):
        # a whole segmentation model: keep its encoder only
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    for _ in range(3):
        if set(state) & target_keys:
            break
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    # timm universal encoders keep the network under ``model.``
    if not set(state) & target_keys and all(k.startswith("model.") for k in target_keys):
        state = {"model." + k: v for k, v in state.items()}
    return state


def _reference_order(encoder: nn.Module) -> list[tuple[str, torch.Size]]:
    """Tensor names and shapes of the network the encoder was cut from, in definition order."""
    if isinstance(encoder, smp.encoders.TimmUniversalEncoder):
        import timm

        with torch.device("meta"):
            full = timm.create_model(encoder.name, pretrained=False)
        return [("model." + k, v.shape) for k, v in full.state_dict().items()]
    return [(k, v.shape) for k, v in encoder.state_dict().items()]


def _map_by_order(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    reference = _reference_order(encoder)
    if len(reference) != len(state):
        raise EncoderWeightsError(
            f"Cannot map weights by order: the file has {len(state)} tensors, the reference network "
            f"has {len(reference)}"
        )
    mapped, bad = {}, []
    for (src_key, tensor), (dst_key, shape) in zip(state.items(), reference):
        if tensor.shape != shape and not _is_adaptable_first_conv(tensor, shape):
            bad.append(f"{src_key} {tuple(tensor.shape)} -> {dst_key} {tuple(shape)}")
        mapped[dst_key] = tensor
    if bad:
        raise EncoderWeightsError(
            "Cannot map weights by order, shapes differ at "
            + f"{len(bad)} positions:\n  "
            + "\n  ".join(bad[:10])
        )
    return mapped


def _is_adaptable_first_conv(tensor: torch.Tensor, shape: torch.Size) -> bool:
    return (
        tensor.ndim == 4
        and len(shape) == 4
        and tensor.shape[1] == 3
        and tensor.shape[0] == shape[0]
        and tensor.shape[2:] == shape[2:]
    )


def _has_module(root: nn.Module, key: str) -> bool:
    module_path = key.rsplit(".", 1)[0]
    try:
        root.get_submodule(module_path)
    except AttributeError:
        return False
    return True


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "\n  " + "\n  ".join(keys[:limit]) + more


def load_encoder_weights(
    encoder: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    key_mapping: str = "auto",
) -> nn.Module:
    """Load a local state dict into an smp/timm encoder with strict key and shape checks.

    Args:
        encoder: ``model.encoder`` of any smp-style model.
        source: path to a ``.safetensors``/``.pth`` file or a directory, or a state dict.
        key_mapping: ``"auto"``, ``"by_name"`` or ``"by_order"`` (see module docstring).

    Raises:
        EncoderWeightsError: listing missing / unexpected keys or mismatched shapes.
    """
    if key_mapping not in ("auto", "by_name", "by_order"):
        raise ValueError(f"key_mapping must be 'auto', 'by_name' or 'by_order', got {key_mapping!r}")
    origin = str(source) if not isinstance(source, Mapping) else "<state dict>"
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    target = encoder.state_dict()
    state = _strip_wrappers(state, set(target))
    if key_mapping == "by_order" or (key_mapping == "auto" and not set(state) & set(target)):
        state = _map_by_order(state, encoder)

    unexpected = [k for k in state if k not in target]
    head_keys = [k for k in unexpected if not _has_module(encoder, k)]
    unexpected = [k for k in unexpected if k not in head_keys]
    missing = [k for k in target if k not in state]
    if missing or unexpected:
        raise EncoderWeightsError(
            f"Encoder weights from {origin} do not fit the encoder."
            + (f"\nMissing keys ({len(missing)}):{_fmt_keys(missing)}" if missing else "")
            + (f"\nUnexpected keys ({len(unexpected)}):{_fmt_keys(unexpected)}" if unexpected else "")
        )

    loaded, bad_shapes = {}, []
    for key, value in target.items():
        tensor = state[key]
        if tensor.shape != value.shape:
            if _is_adaptable_first_conv(tensor, value.shape):
                from timm.models import adapt_input_conv

                tensor = adapt_input_conv(value.shape[1], tensor)
            else:
                bad_shapes.append(f"{key}: file {tuple(tensor.shape)} vs encoder {tuple(value.shape)}")
        loaded[key] = tensor.to(value.dtype)
    if bad_shapes:
        raise EncoderWeightsError(
            f"Encoder weights from {origin} have {len(bad_shapes)} mismatched shapes:{_fmt_keys(bad_shapes)}"
        )
    if head_keys:
        warnings.warn(
            f"Ignored {len(head_keys)} tensors of layers the encoder does not have (classifier head): "
            + ", ".join(head_keys[:5])
            + (" ..." if len(head_keys) > 5 else ""),
            stacklevel=2,
        )
    nn.Module.load_state_dict(encoder, loaded, strict=True)
    return encoder


@contextlib.contextmanager
def download_hint(encoder_name: str, weights: Any) -> Iterator[None]:
    """Turn a failed weights download into an error that says how to load weights offline."""
    try:
        yield
    except (KeyError, ValueError, TypeError, EncoderWeightsError):  # the latter: already explained
        raise
    except Exception as exc:
        if weights is None:
            raise
        reason = str(exc).strip().split(". ")[0].splitlines()[0]
        raise EncoderWeightsError(
            f"Could not fetch pretrained weights {weights!r} for encoder {encoder_name!r} "
            f"({type(exc).__name__}: {reason}).\n"
            "Without internet (e.g. a competition kernel), pass a local file instead: "
            "encoder_weights='/path/to/encoder.safetensors' (or .pth), made on a connected machine with "
            "safetensors.torch.save_file(model.encoder.state_dict(), 'encoder.safetensors') or taken from "
            "a timm/torchvision checkpoint; or encoder_weights=None for random initialisation."
        ) from exc


def weights_for(name: str, weights: str | os.PathLike) -> str | os.PathLike:
    """In a weights directory, the file named after encoder ``name`` (with or without smp's ``tu-``
    prefix, any of ``WEIGHT_SUFFIXES``) when there is one; else ``weights`` unchanged."""
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        return weights
    stems = dict.fromkeys([name, name.removeprefix("tu-")])
    named = [folder / f"{stem}{suffix}" for stem in stems for suffix in WEIGHT_SUFFIXES]
    return next((str(p) for p in named if p.is_file()), weights)


def get_encoder(
    name: str,
    in_channels: int = 3,
    depth: int = 5,
    weights: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """smp's ``get_encoder`` that also accepts a local weights path and explains offline failures."""
    if is_local_weights(weights):
        encoder = smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth, weights=None, **kwargs)
        return load_encoder_weights(encoder, weights_for(name, weights))
    with download_hint(name, weights):
        return smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth, weights=weights, **kwargs)
