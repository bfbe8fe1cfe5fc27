"""Adam(W) step cost: torch's default (``foreach``) kernel vs the fused one the pipeline uses, side by side.

Two measurements, alternating the two kernels in one process so both see the same machine state:
- the optimizer step alone (gradients already there) on the model of a config;
- a whole training step (forward, loss, backward, optimizer step) of that config's model and loss at its
  crop size and batch.
Prints medians and the ratio. The pipeline's ``build_optimizer`` is the fused one; the parameter updates of
the two kernels agree to rounding (tests/competition/core/test_config_metrics.py).

python benchmarks/optimizer_step.py --config tiny_cpu --size 128 --batch 4 --threads 2
python benchmarks/optimizer_step.py --config camvid_lite0 --size 192,256 --batch 8 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from competition.core.config_file import load_config
from competition.core.runtime import build_model
from competition.train.optim import build_criterion


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny_cpu")
    parser.add_argument("--size", default="128", help="crop side, or height,width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = ([int(v) for v in args.size.split(",")] * 2)[:2]
    cfg = load_config(args.config)
    criterion = build_criterion(cfg, args.classes)
    x, y = torch.randn(args.batch, 3, h, w), torch.randint(0, args.classes, (args.batch, h, w))
    setups = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, args.classes, pretrained=False).train()
        setups[fused] = (model, torch.optim.AdamW(model.parameters(), 1e-3, fused=fused))

    def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    optimizer_only: dict[bool, list[float]] = {False: [], True: []}
    whole: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats + 2):  # the first two: warm-up
        for fused, (model, optimizer) in setups.items():
            started = time.perf_counter()
            train_step(model, optimizer)
            middle = time.perf_counter()
            optimizer.step()  # the gradients of the step above, once more: the optimizer alone
            ended = time.perf_counter()
            if repeat >= 2:
                whole[fused].append(middle - started)
                optimizer_only[fused].append(ended - middle)
    params = sum(p.numel() for p in setups[True][0].parameters()) / 1e6
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()} torch {torch.__version__}, {args.threads} threads; "
        f"{args.config} model ({params:.1f} M parameters), batch {args.batch} at {h}x{w}"
    )
    print("| measure | foreach (torch default) s | fused s | ratio |\n|---|---:|---:|---:|")
    for name, times in (("optimizer step alone", optimizer_only), ("whole training step", whole)):
        slow, fast = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {slow:.3f} | {fast:.3f} | {slow / fast:.2f}x |")


if __name__ == "__main__":
    main()
