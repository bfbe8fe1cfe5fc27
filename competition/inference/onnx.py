"""A fold's model as an ONNX graph: exported with dynamic batch and size, checked against the eager model
before it is kept, and run by onnxruntime (``predict --engine onnxruntime``) as the eager model would be. The
graph's metadata records the encoder's output stride, so inputs are padded to it as eager predict pads them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["OnnxModel", "export_onnx", "ONNX_FILE", "OnnxError"]

ONNX_FILE = "model.onnx"
STRIDE_KEY = "output_stride"  # ONNX metadata: the eager encoder's output stride (inputs are padded to it)
ONNX_TOLERANCE = 1e-4  # max |logit difference| between onnxruntime and eager, relative to the largest |logit|


class OnnxError(ValueError):
    """An ONNX graph that cannot be made or used as it is; the message names the file at fault."""


class OnnxModel(nn.Module):
    """A fold's ``model.onnx`` run by onnxruntime (CPU), returning the logits as the eager model would."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError(
                "--engine onnxruntime needs onnxruntime: pip install \"smp-unet3p[infer]\""
            ) from exc
        if not Path(path).is_file():
            raise OnnxError(f"{path} not found: export the bundle with --onnx to predict with onnxruntime")
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        stride = self.session.get_modelmeta().custom_metadata_map.get(STRIDE_KEY)
        # what input sides must divide by, recorded at export (None: a graph exported before it was)
        self.output_stride = int(stride) if stride else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: x.detach().float().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)


def _set_metadata(path: Path, values: dict[str, str]) -> None:
    """Add ``values`` to an ONNX file's metadata (read back by ``OnnxModel``)."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError('export --onnx needs onnx: pip install "smp-unet3p[infer]"') from exc
    graph = onnx.load(str(path))
    for key, value in values.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def export_onnx(fold_dir: Path, target: Path) -> float:
    """Export a fold's best weights to ``target`` (dynamic batch, height and width) and check onnxruntime
    against eager on a random input of another size than the export's; returns the max logit difference
    relative to the largest logit."""
    from ..core.checkpoint import load_fold_model
    from ..core.runtime import main_logits, output_stride, padded_size

    model, cfg, _ = load_fold_model(fold_dir, "cpu")
    stride = output_stride(model)
    height, width = padded_size(cfg.augment.hw(cfg.augment.eval_size) or (256, 256), stride)
    sample = torch.rand(1, cfg.model.in_channels, height, width)  # the eval size padded to the stride
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on smp's shape checks: the export is checked against eager below instead
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model, (sample,), str(target), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": axes, "logits": axes}, opset_version=17, dynamo=False,
        )  # fmt: skip
        check = torch.rand(2, cfg.model.in_channels, height + stride, width + 2 * stride)
        _set_metadata(target, {STRIDE_KEY: str(stride)})
        eager = main_logits(model(check))
    onnx_out = OnnxModel(target)(check)
    difference = float((onnx_out - eager).abs().max() / eager.abs().max().clamp(min=1.0))
    if not difference <= ONNX_TOLERANCE:
        raise OnnxError(
            f"{fold_dir}: the ONNX export differs from the eager model by {difference:.2e} of the largest "
            f"logit (tolerance {ONNX_TOLERANCE}); export without --onnx and predict with --engine torch"
        )
    return difference
