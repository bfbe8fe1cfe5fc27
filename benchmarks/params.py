"""Parameter table: Unet3Plus vs smp Unet / UnetPlusPlus on the same encoders (11 classes).

python benchmarks/params.py            # prints a markdown table
"""

from __future__ import annotations

import argparse

import smp_unet3p

VARIANTS = [
    ("Unet", {}),
    ("UnetPlusPlus", {}),
    ("Unet3Plus", {}),
    ("Unet3Plus", {"deep_supervision": True, "cgm": True}),
    ("Unet3Plus", {"decoder_cat_channels": 32}),
]


def count(model) -> tuple[float, float]:
    total = sum(p.numel() for p in model.parameters())
    decoder = total - sum(p.numel() for p in model.encoder.parameters())
    return total / 1e6, decoder / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoders", nargs="+", default=["resnet34", "efficientnet-b0"])
    parser.add_argument("--classes", type=int, default=11)
    args = parser.parse_args()
    print("| encoder | model | params (M) | decoder + heads (M) |")
    print("|---|---|---:|---:|")
    for encoder in args.encoders:
        for arch, extra in VARIANTS:
            model = smp_unet3p.create_model(
                arch, encoder, encoder_weights=None, classes=args.classes, **extra
            )
            name = arch + "".join(f" {k}={v}" for k, v in extra.items())
            total, decoder = count(model)
            print(f"| {encoder} | {name} | {total:.2f} | {decoder:.2f} |")


if __name__ == "__main__":
    main()
