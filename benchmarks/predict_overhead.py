"""Pipeline overhead of ``competition predict``: the whole command (JPEG decoding, 5 folds x hflip TTA,
probability averaging, argmax, 256x256 resize, CSV writing and validation) vs the bare model forwards of the
same count on preloaded tensors, measured side by side in one run. Target: <= 1.10x.

The 5 "folds" are untrained Unet3Plus models saved in our run-directory format (weights do not change speed).

python benchmarks/predict_overhead.py                                   # CPU: 16 images of 256x256
python benchmarks/predict_overhead.py --device cuda --images 200 --size 512 --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from competition.core import checkpoint as ckpt
from competition.core.config_file import config_from_dict
from competition.core.io import atomic_write_text
from competition.core.runtime import autocast, build_model
from competition.data.classes import BOOSTCAMP_CLASSES
from competition.inference.predict import predict
from competition.inference.predictor import InferenceOptions, parse_tta


def make_run(root: Path, encoder: str, folds: int) -> Path:
    raw = {
        "name": "bench",
        "output_dir": str(root / "runs"),
        "data": {"root": str(root), "annotations": str(root / "test.json"), "folds": str(root / "f.csv")},
        "model": {"arch": "unet3plus", "encoder_name": encoder, "encoder_weights": None},
    }
    cfg = config_from_dict(raw)
    for k in range(folds):
        run_dir = cfg.run_dir(k)
        run_dir.mkdir(parents=True)
        torch.manual_seed(k)
        model = build_model(cfg, len(BOOSTCAMP_CLASSES), pretrained=False)
        atomic_write_text(run_dir / ckpt.CONFIG_FILE, cfg.to_yaml())
        ckpt.write_best(run_dir, model, {"classes": list(BOOSTCAMP_CLASSES), "miou": 0.0, "epoch": 0})
    return cfg.output_dir / cfg.name


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        images = []
        for i in range(args.images):
            name = f"batch_01/{i:04d}.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / name), rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
            images.append({"id": i, "file_name": name, "height": args.size, "width": args.size})
        (root / "test.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
        run = make_run(root, args.encoder, args.folds)
        opts = InferenceOptions(views=parse_tta("hflip"), amp=args.amp, channels_last=args.channels_last)

        def pipeline() -> float:
            start = time.perf_counter()
            predict(
                [run], root, root / "test.json", root / "sub.csv", opts=opts, overlays=0,
                batch_size=args.batch, workers=args.workers, device=device, overwrite=True, progress=False,
            )  # fmt: skip
            return time.perf_counter() - start

        models = [ckpt.load_fold_model(d, device)[0] for d in sorted(run.glob("fold*"))]
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        models = [m.to(memory_format=fmt) for m in models]
        batch = torch.rand(args.batch * 2, 3, args.size, args.size, device=device).contiguous(
            memory_format=fmt
        )

        @torch.no_grad()
        def bare() -> float:  # same forwards: every batch x every fold, 2 views stacked in one forward
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(0, args.images, args.batch):
                for m in models:
                    with autocast(device, args.amp):
                        m(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        bare()  # warm-up both paths once
        pipeline()
        t_bare, t_pipe = min(bare() for _ in range(2)), min(pipeline() for _ in range(2))
    print(
        f"{platform.machine()} torch {torch.__version__} device={device} images={args.images} "
        f"size={args.size} folds={args.folds} tta=hflip batch={args.batch} workers={args.workers} "
        f"amp={args.amp}"
    )
    print(f"bare forwards {t_bare:.2f}s | competition predict {t_pipe:.2f}s | ratio {t_pipe / t_bare:.3f}x")


if __name__ == "__main__":
    main()
