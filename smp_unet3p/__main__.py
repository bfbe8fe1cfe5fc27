"""``python -m smp_unet3p``: build a UNet 3+ with deep supervision and CGM, train it a few steps on synthetic
shapes (CPU, seconds) and print what it returns, so a fresh install can be checked in one line."""

from __future__ import annotations

import argparse

import torch

from smp_unet3p import Unet3Plus
from smp_unet3p.losses import DeepSupervisionLoss, get_loss


def synthetic_batch(batch: int, size: int, classes: int, generator: torch.Generator):
    """Images with one filled square per present class; the class sets the square's colour."""
    images = torch.rand(batch, 3, size, size, generator=generator) * 0.2
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    colours = torch.rand(classes, 3, generator=generator)
    for b in range(batch):
        for cls in range(1, classes):
            if torch.rand(1, generator=generator) < 0.5:
                y, x = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
                masks[b, y : y + size // 4, x : x + size // 4] = cls
                images[b, :, y : y + size // 4, x : x + size // 4] = colours[cls, :, None, None]
    return images, masks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m smp_unet3p", description=__doc__)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Unet3Plus(
        args.encoder, encoder_weights=None, classes=args.classes, deep_supervision=True, cgm=True
    )
    criterion = DeepSupervisionLoss(get_loss("dice_ce", args.classes), classes=args.classes, cgm_weight=0.4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"Unet3Plus({args.encoder}, classes={args.classes}, deep_supervision, cgm): {params:.2f} M parameters"
    )

    images, masks = synthetic_batch(8, args.size, args.classes, gen)
    model.train()
    for step in range(args.steps):
        out = model(images)
        loss = criterion(out, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}")
    shapes = {
        k: (tuple(v.shape) if torch.is_tensor(v) else [tuple(t.shape) for t in v]) for k, v in out.items()
    }
    print("train-mode output:", shapes)
    model.eval()
    with torch.no_grad():
        pred = model(images).argmax(1)
    print(
        "eval-mode output:",
        tuple(model(images[:1]).shape),
        f"pixel accuracy {(pred == masks).float().mean():.3f}",
    )


if __name__ == "__main__":
    main()
