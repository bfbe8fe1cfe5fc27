"""Unet3Plus vs smp Unet / UnetPlusPlus / UPerNet on the same encoders, measured side by side in one run.

Per model: forward GFLOP/img (``torch.utils.flop_counter``), train img/s (forward + backward + AdamW step),
inference img/s, peak memory (CUDA only) and achieved TFLOP/s; ratios are against UnetPlusPlus on the same
encoder. ``Unet3Plus paper order`` is ``decoder_upsample_after_conv=False`` (the before/after of our decoder
change).

python benchmarks/models.py                                    # CPU: 256x256, batch 2, fp32
python benchmarks/models.py --device cuda --size 512 --batch 16 --amp bf16 --channels-last   # GPU setting
python benchmarks/models.py --encoders tu-efficientnet_lite0 --size 224 --batch 8 \\
    --models "Unet,Unet3Plus cat32 DS+CGM,UPerNet"                 # the CamVid recipe's models
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import smp_unet3p

DS_CGM = {"deep_supervision": True, "cgm": True}
VARIANTS = [
    ("Unet", "unet", {}),
    ("UnetPlusPlus", "unetplusplus", {}),
    ("Unet3Plus", "unet3plus", {}),
    ("Unet3Plus DS+CGM", "unet3plus", {"deep_supervision": True, "cgm": True}),
    ("Unet3Plus cat32", "unet3plus", {"decoder_cat_channels": 32}),
    ("Unet3Plus cat32 DS+CGM", "unet3plus", {"decoder_cat_channels": 32, **DS_CGM}),
    ("Unet3Plus paper order", "unet3plus", {"decoder_upsample_after_conv": False}),
    ("UPerNet", "upernet", {}),
]


def measure(model, args, device) -> dict[str, float]:
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
    )
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    gflop = counter.get_total_flops() / 1e9

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(step, iters):
        for _ in range(args.warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        return args.batch * iters / (time.perf_counter() - start)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with amp:
            out = model(x)
            logits = out["masks"] if isinstance(out, dict) else out
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
            for side in out.get("side_masks", []) if isinstance(out, dict) else []:
                loss = loss + torch.nn.functional.cross_entropy(side.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step():
        with amp:
            model(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    train = timed(train_step, args.iters)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    model.eval()
    infer = timed(infer_step, args.iters)
    return {"gflop": gflop, "train": train, "infer": infer, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoders", default="resnet34,efficientnet-b0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--models", default="", help=f"comma-separated labels (default all; UnetPlusPlus is always run): "
        f"{', '.join(v[0] for v in VARIANTS)}",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"{platform.processor() or platform.machine()} torch {torch.__version__} device={device} "
        f"size={args.size} batch={args.batch} amp={args.amp} channels_last={args.channels_last}\n"
    )
    header = (
        "| encoder | model | GFLOP/img | train img/s | infer img/s | peak mem GiB | train x UNet++ | "
        "infer x UNet++ | train TFLOP/s x UNet++ | infer TFLOP/s x UNet++ | mem x UNet++ |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for encoder in args.encoders.split(","):
        rows = {}
        for label, arch, kwargs in VARIANTS:
            if args.models and label not in {"UnetPlusPlus", *args.models.split(",")}:
                continue
            model = smp_unet3p.create_model(
                arch, encoder, encoder_weights=None, classes=args.classes, **kwargs
            )
            rows[label] = measure(model, args, device)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = rows["UnetPlusPlus"]
        for label, r in rows.items():
            print(
                f"| {encoder} | {label} | {r['gflop']:.1f} | {r['train']:.2f} | {r['infer']:.2f} | "
                f"{r['memory']:.2f} | {r['train'] / base['train']:.2f} | {r['infer'] / base['infer']:.2f} | "
                f"{r['train'] * r['gflop'] / (base['train'] * base['gflop']):.2f} | "
                f"{r['infer'] * r['gflop'] / (base['infer'] * base['gflop']):.2f} | "
                f"{r['memory'] / base['memory']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
