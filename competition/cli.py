"""``competition``: the pipeline's command line, one subcommand per stage."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings
from typing import Any

from .data.classes import CocoFormatError


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless its text already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


STAGES = ("prepare", "folds", "train", "sweep", "predict", "export", "pseudo", "ensemble", "validate",
          "evaluate", "audit", "report", "demo")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``competition`` parser: one subparser per stage, each built by its module in ``commands``."""
    parser = argparse.ArgumentParser(
        prog="competition",
        description="Kaggle-style COCO segmentation pipeline on smp_unet3p: prepare -> folds -> train -> "
        "predict -> ensemble -> submit.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>", parser_class=_Parser)
    for stage in STAGES:
        importlib.import_module(f".commands.{stage}", __package__).add(sub)
    for action in sub._choices_actions:  # `competition STAGE --help` opens with what the stage does
        stage = sub.choices[action.dest]
        stage.description = stage.description or (action.help[:1].upper() + action.help[1:] + ".")
    return parser


OOM_HINTS = {
    "train": "lower train.batch_size (keep the effective batch with train.accum_steps), set train.amp=bf16, "
    "train a smaller augment.size crop, or a lighter model (model.params.decoder_cat_channels=32)",
    "predict": "lower --batch-size, use fewer TTA views/scales, --amp bf16, or --tile 512 (sliding window) "
    "for large images",
}


_SHOWN: set[str] = set()  # warning lines already printed by this command


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as short ``warning: ...`` lines, one per line of the message (no source path, no code), each
    once per command (a stage that opens the same runs twice warns once)."""
    for text in str(message).splitlines():
        if text.strip() and text.strip() not in _SHOWN:
            _SHOWN.add(text.strip())
            print(f"warning: {text.strip()}", file=sys.stderr)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a killed job, a kernel's time limit) stops like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may come after flags: `train --resume runs/a train.epochs=20 --fold 1 key=value`
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:  # `&` and nohup start jobs with SIGINT ignored: kill -INT must still stop them cleanly
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _terminate)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    _SHOWN.clear()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            return _run(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace) -> int:
    # imported here, not at the top: `competition --help` and parse errors answer without loading torch
    import torch

    from smp_unet3p.encoders import EncoderWeightsError

    from .core.checkpoint import CheckpointError
    from .core.io import OutputExistsError
    from .train.loop import NonFiniteLossError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # `train` says where it stopped and how to continue (commands.cmd_train)
        print(f"competition {args.command}: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as exc:
        print(
            f"competition {args.command}: error: out of memory: {str(exc).splitlines()[0]}", file=sys.stderr
        )
        print(f"hint: {OOM_HINTS.get(args.command, OOM_HINTS['train'])}", file=sys.stderr)
        return 1
    except ImportError as exc:  # an optional extra not installed: its message says what to install
        print(f"competition {args.command}: error: {exc}", file=sys.stderr)
        if not exc.__cause__ and getattr(exc, "name", None):
            print(f"hint: install {exc.name} (the package's extras: see README, Install)", file=sys.stderr)
        return 1
    except (
        CocoFormatError,
        OutputExistsError,
        FileNotFoundError,
        ValueError,
        CheckpointError,
        NonFiniteLossError,
        OSError,
        EncoderWeightsError,
    ) as exc:  # the expected errors: their message names the file, flag or key at fault
        print(f"competition {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
