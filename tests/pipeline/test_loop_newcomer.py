"""Issue "The loop as a newcomer ran it": resume what was started, one validation fold, fail before the models
load. One test (or more) per numbered item of the issue's "Why"; each failed on the main before it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest
import torch
import yaml

from competition.cli import build_parser, main
from tests.conftest import REPO, tiny_config_dict

ROOT = REPO


def _config(synthetic_data, tmp_path, name="loop", folds=None, **train):
    raw = tiny_config_dict(synthetic_data, tmp_path, **train) | {"name": name}
    if folds is not None:
        raw["data"]["folds"] = str(folds)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _folds_dirs(run):
    return sorted(p.name for p in run.glob("fold*"))


# ------------------------------------------------ 1. --resume continues the folds it was started for
def test_resume_after_an_interrupt_continues_only_the_folds_asked_for(synthetic_data, tmp_path, capsys):
    from competition.train import loop as train_module

    config = _config(synthetic_data, tmp_path, name="term", epochs=2)
    original = train_module.FoldRun.save

    def interrupt(self, epoch, row, improved):  # Ctrl-C at the end of fold 0's first epoch
        original(self, epoch, row, improved)
        raise KeyboardInterrupt

    train_module.FoldRun.save = interrupt
    try:
        assert main(["train", "--config", str(config), "--fold", "0"]) == 130
    finally:
        train_module.FoldRun.save = original
    hint = capsys.readouterr().err
    assert f"continue with competition train --resume {tmp_path / 'term'}" in hint
    assert main(["train", "--resume", str(tmp_path / "term")]) == 0  # the printed command
    assert _folds_dirs(tmp_path / "term") == ["fold0"]  # never fold 1
    assert len(pd.read_csv(tmp_path / "term" / "fold0" / "metrics.csv")) == 2
    assert json.loads((tmp_path / "term" / "run.json").read_text()) == {"folds": [0]}


def test_resume_after_patience_time_limit_or_to_extend_trains_no_other_fold(synthetic_data, tmp_path, capsys):
    config = _config(synthetic_data, tmp_path, name="p", epochs=3, patience=1)
    assert main(["train", "--config", str(config), "--fold", "1"]) == 0
    run = tmp_path / "p"
    assert main(["train", "--resume", str(run)]) == 0
    assert _folds_dirs(run) == ["fold1"]
    assert main(["train", "--resume", str(run), "train.epochs=4"]) == 0  # extension: fold 1 only
    assert _folds_dirs(run) == ["fold1"]
    config = _config(synthetic_data, tmp_path, name="t", epochs=2, time_limit=1e-3)
    assert main(["train", "--config", str(config), "--fold", "1"]) == 0
    out = capsys.readouterr().out
    assert f"continue with competition train --resume {tmp_path / 't'}" in out
    assert main(["train", "--resume", str(tmp_path / "t"), "train.time_limit=3600"]) == 0
    assert _folds_dirs(tmp_path / "t") == ["fold1"]
    assert len(pd.read_csv(tmp_path / "t" / "fold1" / "metrics.csv")) == 2


def test_resume_of_a_finished_run_trains_nothing_and_skips_the_start_up(synthetic_data, tmp_path, capsys):
    config = _config(synthetic_data, tmp_path, name="done", epochs=1)
    assert main(["train", "--config", str(config), "--fold", "0"]) == 0
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["train", "--resume", str(tmp_path / "done")]) == 0
    out = capsys.readouterr().out
    assert "fold 0: finished (1 epochs" in out and "threads" not in out  # no fold start-up line
    assert time.perf_counter() - started < 5  # no preflight, no model built (was 12 s)


# ----------------------------------------------------------- 2. a ViT / Swin at the wrong crop: one hint
def test_swin_at_the_wrong_crop_names_dynamic_img_size_and_a_vit_a_pyramid(synthetic_data, tmp_path):
    from competition.core.config_file import config_from_dict
    from competition.train.preflight import PreflightError, check_model

    raw = tiny_config_dict(synthetic_data, tmp_path)
    swin = "tu-swin_tiny_patch4_window7_224"
    raw["model"] = {"arch": "unet3plus", "encoder_name": swin, "encoder_weights": None,
                    "params": {"decoder_cat_channels": 8}}  # fmt: skip
    with pytest.raises(PreflightError, match=r"match model \(224\).*model.params.dynamic_img_size=true"):
        check_model(config_from_dict(raw), (128, 128))  # a real timm Swin raises AssertionError
    raw["model"]["params"]["dynamic_img_size"] = True
    assert check_model(config_from_dict(raw), (128, 128)) > 0
    raw["model"] = {"arch": "unet3plus", "encoder_name": "tu-vit_tiny_patch16_224", "encoder_weights": None}
    with pytest.raises(PreflightError, match="plain ViT has no feature pyramid"):
        check_model(config_from_dict(raw), (128, 128))


# ------------------------------------------------- 3. predict chooses its threads and says how it runs
def test_predict_chooses_threads_as_train_does_and_prints_a_start_up_line(
    trained_run, synthetic_data, tmp_path, capsys
):
    from competition.core.runtime import cpu_threads

    cfg, _ = trained_run
    args = ["predict", "--runs", str(cfg.output_dir / cfg.name), "--data-root", str(synthetic_data["root"]),
            "--test", str(synthetic_data["test"]), "--out", str(tmp_path / "s.csv"), "--workers", "1",
            "--overlays", "0"]  # fmt: skip
    torch.set_num_threads(2)
    try:
        assert main(args) == 0
        assert torch.get_num_threads() == cpu_threads(None, 1)
    finally:
        torch.set_num_threads(2)
    out = capsys.readouterr().out
    assert re.search(r"predict: 4 images x 2 models x 2 views on cpu, \d+ threads, 1 workers", out)


# ---------------------------------------------------- 4. a wrong data root fails before anything is made
def test_a_wrong_data_root_fails_in_prepare_and_predict_before_any_folder_or_model(
    trained_run, synthetic_data, tmp_path, capsys, monkeypatch
):
    import competition.inference.predict

    wrong = tmp_path / "demo_outpt" / "data"
    args = ["prepare", "--data-root", str(wrong), "--annotations", str(synthetic_data["train"])]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "12 of the 12 images named by" in err and f"{wrong} does not exist" in err and "--data-root" in err
    assert not (tmp_path / "demo_outpt").exists()  # no misspelt folder with a mask cache in it

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(competition.inference.predict, "load_runs", no_models)
    cfg, _ = trained_run
    args = ["predict", "--runs", str(cfg.output_dir / cfg.name), "--data-root", str(wrong), "--test",
            str(synthetic_data["test"]), "--out", str(tmp_path / "s.csv")]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "4 of the 4 images named by" in err and len(err.strip().splitlines()) == 1


def test_prepare_keeps_its_statistics_unless_asked_to_overwrite(synthetic_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data["root"], data, ignore=shutil.ignore_patterns(".mask_cache"))
    args = ["prepare", "--data-root", str(data), "--annotations", str(data / "train.json"), "--overlays", "0",
            "--workers", "1"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 1 and "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


# ------------------------------------------------------- 5. kill -INT stops a background job cleanly
def test_sigint_stops_a_job_started_with_sigint_ignored(synthetic_data, tmp_path):
    config = _config(synthetic_data, tmp_path, name="bg", epochs=50)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(
        [sys.executable, "-m", "competition.cli", "train", "--config", str(config), "--fold", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `&` and nohup start jobs
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "bg" / "fold0" / "metrics.csv").is_file():
            assert time.monotonic() < deadline and job.poll() is None, job.communicate()
            time.sleep(0.5)
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=240)
    finally:
        job.kill()
    assert job.returncode == 130, err
    assert "interrupted in fold 0" in err and "Traceback" not in err
    assert len(pd.read_csv(tmp_path / "bg" / "fold0" / "metrics.csv")) < 50


# -------------------------------------------------- 6. one validation fold is a complete run
def _standard_split(synthetic_data, tmp_path):
    """The synthetic folds file with fold 1 marked train-only: val = fold 0, train = the rest."""
    table = pd.read_csv(synthetic_data["folds"], dtype=str)
    table["fold"] = table["fold"].replace({"1": "train"})
    path = tmp_path / "split.csv"
    table.to_csv(path, index=False)
    return path


def test_a_standard_split_is_one_complete_fold_for_every_later_stage(synthetic_data, tmp_path, capsys):
    from competition.data.splits import parse_folds

    split = _standard_split(synthetic_data, tmp_path)
    assert parse_folds("all", split) == [0]
    config = _config(synthetic_data, tmp_path, name="std", folds=split, epochs=1)
    assert main(["train", "--config", str(config)]) == 0  # --fold all: fold 0 only
    run = tmp_path / "std"
    assert _folds_dirs(run) == ["fold0"]
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is partial: no --allow-partial warning
        assert main(["evaluate", "--runs", str(run)]) == 0
    table = capsys.readouterr().out
    assert "all folds" in table and "partial" not in table
    args = ["predict", "--runs", str(run), "--data-root", str(synthetic_data["root"]), "--test",
            str(synthetic_data["test"]), "--out", str(tmp_path / "s.csv"), "--workers", "0"]  # fmt: skip
    assert main([*args, "--overlays", "0"]) == 0
    train_ids = set(pd.read_csv(split, dtype=str).query("fold == 'train'")["image_id"])
    oof = __import__("numpy").load(run / "fold0" / "oof.npz")
    assert not train_ids & set(oof["image_ids"].tolist())  # train-only images are never validated


def test_a_partial_run_is_labelled_partial_and_warned_about_once(synthetic_data, tmp_path, capsys):
    config = _config(synthetic_data, tmp_path, name="half", epochs=1)
    assert main(["train", "--config", str(config), "--fold", "0"]) == 0
    capsys.readouterr()
    run = str(tmp_path / "half")
    assert main(["evaluate", "--runs", run, "--allow-partial"]) == 0
    out, err = capsys.readouterr()
    assert "folds 0 (partial)" in out and "all folds" not in out
    assert len([line for line in err.splitlines() if "fold(s) [1]" in line]) == 1  # once, not twice
    assert main(["report", "--runs", run, "--allow-partial", "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Partial run" in page and "folds 0 (partial)" in page


# ------------------------------------------------------ 7. train takes --data-root / --annotations
def test_train_takes_the_data_flags_and_blames_a_bad_override_not_the_file(synthetic_data, tmp_path, capsys):
    raw = tiny_config_dict(synthetic_data, tmp_path, epochs=1) | {"name": "flags"}
    raw["data"] = {"folds": str(synthetic_data["folds"])}  # no root, no annotations in the file
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(raw))
    args = ["train", "--config", str(tmp_path / "f.yaml"), "--fold", "0", "--data-root",
            str(synthetic_data["root"]), "--annotations", str(synthetic_data["train"])]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["train", "--config", "tiny_cpu", "train.epocs=3"]) == 1
    err = capsys.readouterr().err
    assert "override train.epocs=3: unknown key. Did you mean 'epochs'" in err
    assert "tiny_cpu.yaml" not in err  # the shipped file is not at fault


# ------------------------------------------------------------------------------ 8. the smaller ones
def test_a_refused_init_from_leaves_no_fold_folder(synthetic_data, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    from competition.core.config_file import config_from_dict
    from competition.core.runtime import build_model

    cfg = config_from_dict(tiny_config_dict(synthetic_data, tmp_path))
    __import__("safetensors.torch").torch.save_model(build_model(cfg, 11, pretrained=False), str(foreign))
    config = _config(synthetic_data, tmp_path, name="refused", epochs=1)
    assert main(["train", "--config", str(config), "--fold", "0", "--init-from", str(foreign)]) == 1
    assert "does not record which images" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_an_interrupt_at_the_end_of_an_epoch_keeps_its_summary_line(synthetic_data, tmp_path, capsys):
    from competition.core.config_file import config_from_dict
    from competition.train import loop as train_module

    original = train_module.FoldRun.save

    def signalled(self, epoch, row, improved):  # Ctrl-C lands while the epoch's files are written
        os.kill(os.getpid(), signal.SIGINT)
        original(self, epoch, row, improved)

    train_module.FoldRun.save = signalled
    # pytest started as a background job (`pytest &`) has SIGINT ignored: give it Python's Ctrl-C handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_module.train_fold(config_from_dict(tiny_config_dict(synthetic_data, tmp_path)), 0)
    finally:
        train_module.FoldRun.save = original
        signal.signal(signal.SIGINT, previous)
    assert "fold 0 epoch 1/2" in capsys.readouterr().out


def test_every_subcommand_help_opens_with_what_it_does():
    parser = build_parser()
    stages = next(a for a in parser._actions if a.dest == "command").choices
    assert {name for name, p in stages.items() if not p.description} == set()


def test_export_prints_no_tracer_warning(trained_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from competition.inference.onnx import export_onnx

    cfg, _ = trained_run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(cfg.run_dir(0), tmp_path / "m.onnx")
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
