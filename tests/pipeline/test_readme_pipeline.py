"""The README's pipeline block, run as written on a small synthetic dataset (issue 22), so that its commands
cannot drift from what works. Only what makes it fit a test changes, each rule stated below: the data
folder, fewer folds and epochs, and small models from scratch (no download)."""

import json
import shlex
import shutil

import pandas as pd

from competition.cli import main
from tests.conftest import readme_command_lines

# appended to every `train --config` line: a seconds-long model, nothing downloaded
TINY = [
    "model.encoder_name=resnet18", "model.encoder_weights=null", "train.epochs=1", "train.batch_size=4",
    "train.workers=0", "train.amp=none", "train.channels_last=false", "train.progress=false",
    "augment.size=64",
]  # fmt: skip
TINY_UNET3PLUS = ["model.params.decoder_cat_channels=8"]
RESUME = ["train.workers=0", "train.progress=false"]  # what a resume may change
SHORTER = {"--k 5": "--k 3", "train.epochs=40": "train.epochs=2"}


def test_the_readme_pipeline_runs_as_written(synthetic_data, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data["root"], data, ignore=shutil.ignore_patterns("folds.csv", ".mask_cache"))
    shutil.copy(data / "train.json", data / "train_all.json")
    monkeypatch.chdir(tmp_path)  # runs/ and submission.csv land here, as in the README
    lines = readme_command_lines("## The pipeline")
    assert [shlex.split(line)[1] for line in lines][:3] == ["prepare", "folds", "train"]
    for line in lines:
        for old, new in SHORTER.items():
            line = line.replace(old, new)
        args = shlex.split(line.replace("DATA", str(data)))[1:]
        if args[0] == "train" and "--config" in args:
            args += TINY + (TINY_UNET3PLUS if "unet3plus" in args[args.index("--config") + 1] else [])
        elif args[0] == "train":
            args += RESUME
        if args[0] == "predict":
            args += ["--workers", "0", "--overlays", "0"]
        assert main(args) == 0, f"README line failed: {line}\n{capsys.readouterr().err}"
    metrics = pd.read_csv(tmp_path / "runs" / "unet3plus_r34" / "fold0" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]  # the extended run went on from its first epoch
    assert json.loads((tmp_path / "runs" / "ft" / "fold0" / "best.json").read_text())["fold"] == 0
    test_names = {i["file_name"] for i in json.loads((data / "test.json").read_text())["images"]}
    assert set(pd.read_csv(tmp_path / "submission.csv")["image_id"]) == test_names
