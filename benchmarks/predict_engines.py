"""Inference engines side by side on CPU: eager torch, ``torch.compile`` and onnxruntime (the bundle's
``model.onnx``), for the fold models of a finished run; and the bundle's size against the run folder's.

Exports the run to a bundle with ONNX (``competition export --onnx``), then times forwards of the same
inputs (batch 1 and 4 at the run's eval size) with each engine, interleaved in one process so the ratios
are measured side by side, and checks the engines' argmax agreement.

python benchmarks/predict_engines.py --run /tmp/camvid/runs/u3p_s0 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from competition.core.checkpoint import fold_dirs, load_fold_model
from competition.core.runtime import output_stride, padded_size
from competition.inference.bundle import bundle_size, export_bundle
from competition.inference.onnx import ONNX_FILE, OnnxModel


def timed(fn, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn(x)`` over ``repeats`` calls (after one warm-up), and its output."""
    with torch.no_grad():
        out = fn(x)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2], out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle([args.run], bundle, onnx=True, allow_partial=True)  # the CamVid runs train one fold
        stamp = f"# {time.strftime('%Y-%m-%d')} {platform.node()} torch {torch.__version__}"
        print(f"{stamp}, {args.threads} threads")
        print(
            f"bundle {bundle_size(bundle) / 2**20:.1f} MB, run folder {bundle_size(args.run) / 2**20:.1f} MB"
        )
        fold = fold_dirs(bundle / "runs" / args.run.name)[0]
        model, cfg, _ = load_fold_model(fold)
        height, width = padded_size(cfg.augment.hw(cfg.augment.eval_size) or (256, 256), output_stride(model))
        engines = {
            "eager": model,
            "compile": torch.compile(model),
            "onnxruntime": OnnxModel(fold / ONNX_FILE),
        }
        for batch in (1, 4):
            x = torch.rand(batch, 3, height, width)
            results = {name: timed(engine, x, args.repeats) for name, engine in engines.items()}
            base_seconds, base_out = results["eager"]
            for name, (seconds, out) in results.items():
                agree = float((out.argmax(1) == base_out.argmax(1)).float().mean())
                print(
                    f"batch {batch} {height}x{width} {name:12s} {seconds * 1000:8.1f} ms  "
                    f"{base_seconds / seconds:5.2f}x eager  argmax agreement {agree:.4f}"
                )


if __name__ == "__main__":
    main()
