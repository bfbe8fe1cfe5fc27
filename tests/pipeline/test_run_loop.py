"""The competitor's loop (issue 22): resume a run by its folder, extend it, stop it cleanly."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from competition.cli import main
from competition.core import checkpoint as ckpt
from competition.train.optim import lr_factor
from tests.conftest import tiny_config_dict


def _config(synthetic_data, tmp_path, name="loop", **train):
    raw = tiny_config_dict(synthetic_data, tmp_path, **train) | {"name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_resume_by_run_folder_needs_no_config_and_extends_the_run(synthetic_data, tmp_path, capsys):
    from competition.train.loop import FoldRun
    from competition.train.resume import run_config

    config = _config(synthetic_data, tmp_path, epochs=1)
    # overrides may follow flags
    assert main(["train", "--config", str(config), "train.seed=5", "--fold", "0", "train.epochs=1"]) == 0
    run = tmp_path / "loop"
    assert len(pd.read_csv(run / "fold0" / "metrics.csv")) == 1
    # resumed with more epochs, the lr is at once that of a run planned for 3 epochs, at the same step
    extended = run_config(run, ["train.epochs=3"])
    fold = FoldRun(extended, 0, resume=True)
    fold.resume()
    steps = fold.scheduler.last_epoch
    expected = extended.optimizer.lr * lr_factor(extended, steps, 3 * steps, steps)
    assert fold.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert (
        expected > 2 * extended.optimizer.lr * extended.scheduler.min_lr_ratio
    )  # not the 1-epoch plan's end
    del fold
    capsys.readouterr()
    written = (run / "fold0" / "oof.npz").stat().st_mtime_ns
    assert main(["train", "--resume", str(run), "--fold", "0", "train.epochs=3"]) == 0  # no --config
    assert (run / "fold0" / "oof.npz").stat().st_mtime_ns != written  # trained further: predicted again
    assert "fold 0: resuming after epoch 1" in capsys.readouterr().out
    rows = pd.read_csv(run / "fold0" / "metrics.csv")
    assert list(rows["epoch"]) == [1, 2, 3]
    saved = ckpt.read_run_config(run / "fold0")
    assert saved.train.epochs == 3 and saved.train.seed == 5  # the run's own settings, extended
    assert rows["lr"].iloc[1] == pytest.approx(
        saved.optimizer.lr * lr_factor(saved, 2 * steps, 3 * steps, steps)
    )


def test_resume_refuses_changes_that_would_train_something_else(synthetic_data, tmp_path, capsys):
    config = _config(synthetic_data, tmp_path, epochs=2)
    assert main(["train", "--config", str(config), "--fold", "0"]) == 0
    run = str(tmp_path / "loop")
    capsys.readouterr()
    assert main(["train", "--resume", run, "model.encoder_name=resnet34", "optimizer.lr=0.1"]) == 1
    err = capsys.readouterr().err
    assert "cannot change ['model.encoder_name', 'optimizer.lr'] when resuming" in err
    assert main(["train", "--resume", run, "--fold", "0", "train.epochs=1"]) == 1
    assert "can be extended (more epochs), not shortened" in capsys.readouterr().err
    assert main(["train", "--resume", run, "--config", str(config)]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 1
    assert "run folder" in capsys.readouterr().err
    # the old form still works, and `--resume key=value` is an override, not a folder
    assert main(["train", "--config", str(config), "--fold", "0", "--resume", "train.workers=0"]) == 0
    assert "fold 0: finished (2 epochs" in capsys.readouterr().out  # a finished fold is not retrained
    assert len(pd.read_csv(tmp_path / "loop" / "fold0" / "metrics.csv")) == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_says_where_it_stopped_and_resumes(synthetic_data, tmp_path, sig):
    config = _config(synthetic_data, tmp_path, epochs=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "competition.cli", "train", "--config", str(config), "--fold", "0"]
    # a shell's background job (`pytest &`, a CI runner) starts with SIGINT ignored and Python then installs
    # no KeyboardInterrupt handler: give the child the default disposition a terminal's Ctrl-C meets
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore
    )
    metrics = tmp_path / "loop" / "fold0" / "metrics.csv"
    deadline = time.time() + 300  # generous: a loaded machine (three processes on 2 cores) took over 120 s
    while not (metrics.is_file() and len(pd.read_csv(metrics)) >= 1) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    done = len(pd.read_csv(metrics))
    assert line.startswith(f"interrupted in fold 0, epoch {done + 1} (last.ckpt holds epoch {done})"), line
    assert line.endswith(f"continue with competition train --resume {tmp_path / 'loop'}")
    assert not [p for p in (tmp_path / "loop" / "fold0").iterdir() if ".tmp" in p.name]
    assert ckpt.load_last(tmp_path / "loop" / "fold0" / ckpt.LAST)["epoch"] == done  # where --resume goes on


def test_cpu_threads_default_leaves_room_for_workers_and_other_processes(monkeypatch):
    from competition.core import runtime

    def threads(busy: float, workers: int, requested: int | None = None) -> int:
        monkeypatch.setattr(runtime, "busy_cores", lambda: busy)
        runtime._FREE_CORES.clear()  # decided once per process: judge again
        return runtime.cpu_threads(requested, workers)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert threads(0.2, 0) == 8 and threads(0.2, 2) == 6  # a core's fraction is no reason
    assert threads(5.0, 0) == 3  # others keep 5 cores busy
    assert threads(12.0, 2) == 1 and threads(12.0, 2, requested=4) == 4  # asked for: as asked
    runtime._FREE_CORES.clear()
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0.0)
    first = runtime.cpu_threads(None, 0)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 8.0)  # this run's own load, later
    assert runtime.cpu_threads(None, 0) == first == 8  # later folds keep the first judgement
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.cpu_threads(None, 0) == runtime.torch.get_num_threads()
    runtime._FREE_CORES.clear()


def test_busy_cores_are_what_other_processes_use_now_not_the_trailing_load_average(tmp_path, monkeypatch):
    from competition.core import runtime

    stat = tmp_path / "stat"
    per_cpu = "cpu0 1 0 0 1 0 0 0 0 0 0\ncpu1 1 0 0 1 0 0 0 0 0 0\n"  # two cpus; the first line sums them
    stat.write_text(f"cpu  1000 20 30 5000 40 5 5 0 0 0\n{per_cpu}")
    assert runtime.cpu_ticks(str(stat)) == (2, 1060, 6100)  # busy: user nice system irq softirq steal
    read = runtime.cpu_ticks

    def later(seconds: float) -> None:  # 150 busy ticks of 200 while this process slept: 1.5 cores of 2
        stat.write_text(f"cpu  1100 20 80 5040 50 5 5 0 0 0\n{per_cpu}")

    monkeypatch.setattr(runtime, "cpu_ticks", lambda: read(str(stat)))
    monkeypatch.setattr(runtime.time, "sleep", later)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # trailing: not used on Linux
    stat.write_text(f"cpu  1000 20 30 5000 40 5 5 0 0 0\n{per_cpu}")
    assert runtime.busy_cores() == pytest.approx(1.5)
    monkeypatch.setattr(runtime, "cpu_ticks", lambda: read(str(tmp_path / "missing")))
    assert runtime.busy_cores() == 8.0  # no /proc/stat: the load average less this process


def test_a_fold_prints_where_it_trains_and_an_estimate_after_its_first_epoch(
    synthetic_data, tmp_path, capsys
):
    config = _config(synthetic_data, tmp_path, epochs=2, threads=1)
    assert main(["train", "--config", str(config), "--fold", "0"]) == 0
    out = capsys.readouterr().out
    assert (
        "fold 0: cpu, 1 CPU thread, amp none, channels_last off, compile off; 6 train / 6 val images, " in out
    )
    assert "1 step per epoch (batch 4 x accum 1), 2 epochs" in out
    assert "fold 0: " in out and " s per epoch, about " in out and "for the 1 epoch left" in out


def test_every_option_says_what_it_does_and_its_default(capsys):
    import argparse

    from competition.cli import build_parser

    parser = build_parser()
    stages = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, stage in stages.items():
        for action in stage._actions:
            assert not action.option_strings or action.help, f"{name} {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in text and "(default: boostcamp)" in text  # --overlap, --format
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_and_parse_errors_answer_without_loading_torch():
    code = (
        "import sys; from competition.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'timm', 'segmentation_models_pytorch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"  # `competition --help` in a second, not after ~8 s of imports


def test_validate_takes_class_names_as_prepare_does_or_their_number():
    from competition.cli import build_parser

    parser = build_parser()
    common = ["validate", "s.csv", "--test", "t.json", "--classes"]
    assert parser.parse_args([*common, "Background,Paper,Glass"]).classes == 3
    assert parser.parse_args([*common, "5"]).classes == 5
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "Background"])


def test_patience_finishes_a_fold_early_and_the_run_counts_as_complete(synthetic_data, tmp_path, monkeypatch):
    from competition.core.config_file import config_from_dict
    from competition.predictions.provenance import read_run
    from competition.train import records
    from competition.train.loop import FoldRun, train

    original, first, drawn = FoldRun.validate, {}, []
    monkeypatch.setattr(records, "CURVES_EVERY_S", 1e9)
    monkeypatch.setattr(records, "write_curves", lambda frame, path: drawn.append(len(frame)))

    def flat(self):  # the same validation mIoU every epoch: never better after the first
        loss, matrix = original(self)
        return loss, first.setdefault(self.fold, matrix)

    monkeypatch.setattr(FoldRun, "validate", flat)
    cfg = config_from_dict(tiny_config_dict(synthetic_data, tmp_path, epochs=6, patience=2))
    (result,) = train(cfg, "0")
    assert result.stopped == "patience" and len(result.metrics) == 3  # best at 1, then 2 epochs no better
    assert drawn == [3]  # curves: not per epoch (the interval is not reached) but once the fold stops
    assert (result.run_dir / "oof.npz").is_file()
    fold = read_run(result.run_dir.parent).folds[0]
    assert fold.stopped_early and fold.finished and fold.epochs_done == 3
    written = (result.run_dir / "oof.npz").stat().st_mtime_ns
    (again,) = train(cfg, "0", resume=True)  # nothing left to train
    assert again.stopped == "patience" and len(pd.read_csv(result.run_dir / "metrics.csv")) == 3
    assert (result.run_dir / "oof.npz").stat().st_mtime_ns == written  # nor to predict again: the OOF is kept


def test_curves_are_drawn_at_most_every_interval_and_always_after_the_last_epoch(tmp_path, monkeypatch):
    from competition.train import records

    drawn, clock = [], [0.0]
    monkeypatch.setattr(records, "write_curves", lambda frame, path: drawn.append(len(frame)))
    monkeypatch.setattr(records.time, "monotonic", lambda: clock[0])
    curves = records.Curves(tmp_path / "curves.png", every_s=30)
    for epoch, seconds in enumerate([10, 10, 15, 40, 5, 5], start=1):
        clock[0] += seconds
        curves.update(pd.DataFrame({"epoch": range(1, epoch + 1)}), force=epoch == 6)
    assert drawn == [3, 4, 6]  # 35 s after the start, 40 s after that, and the last epoch
    curves.update(pd.DataFrame({"epoch": range(1, 7)}), force=True)
    assert drawn == [3, 4, 6]  # the same rows are never drawn twice


def test_time_limit_stops_before_an_epoch_that_would_not_fit_and_the_run_resumes(
    synthetic_data, tmp_path, monkeypatch, capsys
):
    from competition.train.loop import FoldRun

    original = FoldRun.epoch

    def slow(self, model, epoch):  # pretend each epoch takes 28 hours
        row, improved = original(self, model, epoch)
        row["seconds"] = 1e5
        return row, improved

    monkeypatch.setattr(FoldRun, "epoch", slow)
    config = _config(synthetic_data, tmp_path, epochs=3, time_limit="30m")
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "loop"
    assert "fold 0: train.time_limit leaves no time for epoch 2" in out
    assert f"train.time_limit reached: continue with competition train --resume {run}" in out
    assert len(pd.read_csv(run / "fold0" / "metrics.csv")) == 1 and not (run / "fold1").exists()
    assert not (run / "fold0" / "oof.npz").exists()  # the fold is not finished
    assert ckpt.load_last(run / "fold0" / ckpt.LAST)["epoch"] == 1
    monkeypatch.setattr(FoldRun, "epoch", original)
    assert main(["train", "--resume", str(run), "--fold", "0", "train.time_limit=null"]) == 0
    assert len(pd.read_csv(run / "fold0" / "metrics.csv")) == 3 and (run / "fold0" / "oof.npz").is_file()


def test_durations_read_as_a_kaggle_user_writes_them():
    from competition.core.config import TrainConfig, parse_duration

    assert parse_duration("8h30m") == 30600 and parse_duration("90m") == 5400 and parse_duration("45") == 45
    assert TrainConfig(time_limit="1.5h").time_limit == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_preflight_fails_in_seconds_naming_the_fault_and_creates_no_run_folder(
    synthetic_data, tmp_path, capsys
):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_data["root"], root)
    raw = tiny_config_dict(synthetic_data, tmp_path) | {"name": "pre"}
    raw["data"]["root"] = str(tmp_path / "elsewhere")  # a wrong data root
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(raw))
    started = time.monotonic()
    assert main(["train", "--config", str(tmp_path / "pre.yaml")]) == 1
    err = capsys.readouterr().err
    assert "12 of the 12 images named by" in err and "(data.root)" in err
    raw["data"]["root"] = str(root)
    first = sorted(root.rglob("train_*.jpg"))[0]
    first.write_bytes(b"not a jpeg")  # one corrupt image
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "pre.yaml")]) == 1
    assert "do not decode" in capsys.readouterr().err
    shutil.copy(next(p for p in synthetic_data["root"].rglob(first.name)), first)
    raw["augment"] = {"size": 72}  # smp's FPN needs a multiple of the encoder's output stride
    raw["model"] = {"arch": "fpn", "encoder_name": "resnet18", "encoder_weights": None}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "pre.yaml")]) == 1
    err = capsys.readouterr().err
    assert "fails at the training crop 72x72 (augment.size)" in err and "multiple of" in err
    assert time.monotonic() - started < 10
    assert not (tmp_path / "pre").exists()  # no run folder was created


def test_preflight_names_the_fix_for_an_encoder_built_for_one_input_size(
    synthetic_data, tmp_path, monkeypatch
):
    from competition.core.config_file import config_from_dict
    from competition.train import preflight

    class FixedSize(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError(f"Input height ({x.shape[2]}) doesn't match model (224).")

    monkeypatch.setattr(preflight, "build_model", lambda cfg, classes: FixedSize())
    cfg = config_from_dict(tiny_config_dict(synthetic_data, tmp_path) | {"augment": {"size": 128}})
    with pytest.raises(preflight.PreflightError, match="dynamic_img_size=true"):
        preflight.check_model(cfg, (64, 64))


def test_validation_pads_any_image_size_to_the_stride_and_scores_the_original_pixels(
    synthetic_data, tmp_path
):
    """CamVid-like frames (here 40x56) reach a model that needs multiples of 32 (smp FPN)."""
    from competition.core.config_file import config_from_dict
    from competition.core.runtime import build_model
    from competition.train.optim import build_criterion
    from competition.train.validation import evaluate

    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["model"] = {"arch": "fpn", "encoder_name": "resnet18", "encoder_weights": None}
    cfg = config_from_dict(raw)
    model = build_model(cfg, 3)
    masks = torch.randint(0, 3, (2, 40, 56))
    masks[0, 0, :10] = 255  # ignored pixels stay ignored
    batch = {"image": torch.randn(2, 3, 40, 56), "mask": masks}
    seen = []
    loss, matrix = evaluate(
        model, [batch], build_criterion(cfg, 3), 3, torch.device("cpu"), cfg, lambda b, p: seen.append(p)
    )
    assert seen[0].shape == (2, 3, 40, 56)  # cropped back to the image
    assert int(matrix.matrix.sum()) == 2 * 40 * 56 - 10 and np.isfinite(loss)
    from competition.core.runtime import output_stride, pad_to_multiple, padded_size

    assert output_stride(model) == 32 and padded_size((40, 56), 32) == (64, 64)
    assert pad_to_multiple(batch["image"], 32)[0].shape[-2:] == padded_size((40, 56), 32)  # one rounding
    assert padded_size((240, 320), 32) == (256, 320) and output_stride(torch.nn.Conv2d(3, 3, 1)) == 32


def test_rotate90_keeps_full_frames_one_shape_and_turns_squares_freely():
    from competition.core.config import AugmentConfig
    from competition.data.transforms import build_train_transform

    tf = build_train_transform(AugmentConfig(size=None, rotate90=1.0, hflip=0.0, normalize="none"))
    frame = np.zeros((36, 48, 3), np.uint8)
    shapes = {tf(image=frame, mask=frame[..., 0])["mask"].shape for _ in range(40)}
    assert shapes == {(36, 48)}
    square = np.zeros((40, 40, 3), np.uint8)
    square[0, 1] = 255  # an asymmetric mark shows which of the 4 turns was taken
    turns = {tuple(np.argwhere(tf(image=square, mask=square[..., 0])["mask"] == 255)[0]) for _ in range(60)}
    assert len(turns) == 4


def test_a_fold_without_training_images_is_an_error_naming_the_fold_and_file(synthetic_data, tmp_path):
    from competition.core.config import ConfigError
    from competition.core.config_file import config_from_dict
    from competition.data.splits import build_datasets

    table = pd.read_csv(synthetic_data["folds"])
    table["fold"] = 0  # one fold holding every image
    table.to_csv(tmp_path / "one.csv", index=False)
    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["data"]["folds"] = str(tmp_path / "one.csv")
    with pytest.raises(ConfigError, match=r"fold 0 of .*one\.csv leaves no training images"):
        build_datasets(config_from_dict(raw), 0)


def test_every_command_line_in_the_readme_parses_as_written():
    """The README's ``competition ...`` lines (continuations joined, comments dropped) name only options
    that exist and give every required one, so the examples cannot drift from the CLI again."""
    import shlex

    from competition.cli import build_parser
    from tests.conftest import readme_command_lines

    lines = readme_command_lines()
    assert len(lines) >= 15
    parser = build_parser()
    for line in lines:
        try:
            args, extra = parser.parse_known_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"README line does not parse: {line}")
        assert all("=" in e and not e.startswith("-") for e in extra), line
        assert not extra or hasattr(args, "overrides"), line


def test_init_from_another_run_loads_its_fold_weights_and_refuses_other_folds(
    synthetic_data, tmp_path, capsys
):
    import safetensors.torch

    from competition.core.config import ConfigError
    from competition.core.config_file import config_from_dict
    from competition.core.runtime import build_model
    from competition.train.resume import init_weights

    teacher = _config(synthetic_data, tmp_path, name="teacher", epochs=1)
    assert main(["train", "--config", str(teacher)]) == 0
    student = config_from_dict(tiny_config_dict(synthetic_data, tmp_path) | {"name": "student"})
    raw = student.model_dump(mode="json")
    raw["train"]["init_from"] = str(tmp_path / "teacher")
    cfg = config_from_dict(raw)
    model = init_weights(build_model(cfg, 11), cfg, 1, announce=True)
    expected = safetensors.torch.load_file(str(tmp_path / "teacher" / "fold1" / "best.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert (
        f"fold 1: initialised from {tmp_path / 'teacher' / 'fold1' / 'best.safetensors'}"
        in capsys.readouterr().out
    )
    table = pd.read_csv(synthetic_data["folds"])
    table["fold"] = 1 - table["fold"]  # the same images, other folds: the teacher's fold 1 saw this fold 1
    table.to_csv(tmp_path / "other.csv", index=False)
    raw["data"]["folds"] = str(tmp_path / "other.csv")
    with pytest.raises(ConfigError, match="another folds file"):
        init_weights(build_model(config_from_dict(raw), 11), config_from_dict(raw), 1)
    raw["train"]["init_any_folds"] = True
    init_weights(build_model(config_from_dict(raw), 11), config_from_dict(raw), 1)  # asked for: accepted
    raw["train"]["init_from"] = str(tmp_path / "teacher" / "fold0" / "best.safetensors")  # one file
    init_weights(build_model(config_from_dict(raw), 11), config_from_dict(raw), 0)
    # the CLI flag: a new run that starts from the teacher, fold by fold
    assert main(["train", "--config", str(_config(synthetic_data, tmp_path, name="s2", epochs=1)),
                 "--init-from", str(tmp_path / "teacher"), "--fold", "0"]) == 0  # fmt: skip
    assert "fold 0: initialised from" in capsys.readouterr().out
    assert ckpt.read_run_config(tmp_path / "s2" / "fold0").train.init_from == str(tmp_path / "teacher")


def test_crop_and_eval_sizes_take_height_and_width():
    from competition.core.config import AugmentConfig, ConfigError
    from competition.core.config_file import config_from_dict
    from competition.data.transforms import build_eval_transform, build_train_transform

    aug = AugmentConfig(size=[64, 96], eval_size=[48, 80], hflip=0.0, normalize="none")
    frame = np.zeros((120, 160, 3), np.uint8)
    assert build_train_transform(aug)(image=frame, mask=frame[..., 0])["mask"].shape == (64, 96)
    assert build_eval_transform(aug)(image=frame, mask=frame[..., 0])["mask"].shape == (48, 80)
    assert AugmentConfig(size=64).hw(64) == (64, 64)
    with pytest.raises(ConfigError, match="at least 32"):
        config_from_dict({"data": {"root": "."}, "augment": {"size": [16, 64]}})


def test_predict_a_folder_of_images_or_a_json_of_images_only(trained_run, synthetic_data, tmp_path, capsys):
    import json
    import shutil

    cfg, _ = trained_run
    run = str(cfg.output_dir / cfg.name)
    test = json.loads(synthetic_data["test"].read_text())
    folder = tmp_path / "images"
    for image in test["images"]:
        (folder / image["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic_data["root"] / image["file_name"], folder / image["file_name"])
    common = ["predict", "--runs", run, "--workers", "0", "--overlays", "0", "--tta", "none"]
    assert main([*common, "--images", str(folder), "--out", str(tmp_path / "a.csv")]) == 0
    only_images = tmp_path / "images_only.json"
    only_images.write_text(json.dumps({"images": test["images"]}))  # no categories, no annotations
    args = [
        "--data-root",
        str(synthetic_data["root"]),
        "--test",
        str(only_images),
        "--out",
        str(tmp_path / "b.csv"),
    ]
    assert main([*common, *args]) == 0
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert sorted(a["image_id"]) == sorted(b["image_id"]) == sorted(i["file_name"] for i in test["images"])
    assert a.set_index("image_id").sort_index().equals(b.set_index("image_id").sort_index())
    assert (
        main([*common, "--images", str(folder), "--test", str(only_images), "--out", str(tmp_path / "c.csv")])
        == 1
    )
    assert "give --images DIR, or --data-root and --test" in capsys.readouterr().err


def test_weights_that_cannot_be_fetched_give_one_offline_hint(synthetic_data, tmp_path, capsys, monkeypatch):
    """Nested download guards (registry and encoder) used to repeat the hint inside a triple traceback."""
    from smp_unet3p.encoders import download_hint

    def fetch():
        with download_hint("resnet34", "imagenet"), download_hint("resnet34", "imagenet"):
            raise ConnectionError("Name or service not known. Retrying ...")

    from competition.train import preflight

    monkeypatch.setattr(preflight, "build_model", lambda cfg, classes: fetch())
    assert main(["train", "--config", str(_config(synthetic_data, tmp_path))]) == 1
    err = capsys.readouterr().err
    assert err.count("Without internet") == 1 and "Traceback" not in err
    assert "(ConnectionError: Name or service not known)" in err
    assert not (tmp_path / "loop").exists()
