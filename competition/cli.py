"""``competition``: the pipeline's command line, one subcommand per stage."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="competition",
        description="Kaggle-style COCO segmentation pipeline on smp_unet3p: prepare -> folds -> train -> "
        "predict -> ensemble -> submit.",
    )
    parser.add_subparsers(dest="command", metavar="<stage>")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
