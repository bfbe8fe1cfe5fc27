"""Reliability battery across stages (data-stage bad inputs are in test_data.py): config, checkpoints,
outputs, numerics, resources. docs/reliability.md lists each case and its behaviour."""

import os

import numpy as np
import pytest
import torch

from competition.cli import main
from competition.core import checkpoint as ckpt
from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict
from competition.core.io import atomic_write_text
from competition.core.metrics import ConfusionMatrix
from competition.core.runtime import build_model
from competition.train.loop import train_fold
from smp_unet3p.losses import DeepSupervisionLoss, available_losses, get_loss
from tests.conftest import tiny_config_dict


def test_classes_mismatch_between_config_and_data_is_named(synthetic_data, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["model"]["classes"] = 5
    with pytest.raises(ConfigError, match=r"model.classes=5 but the data has 11 classes"):
        train_fold(config_from_dict(raw), 0)


def test_checkpoint_from_another_architecture_or_encoder_is_named(trained_run):
    cfg, results = trained_run
    weights = results[0].run_dir / "best.safetensors"
    for change in ({"arch": "unet", "params": {}}, {"encoder_name": "resnet34"}):
        other = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update=change)}), 11, False)
        with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
            ckpt.load_weights(other, weights)


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "best.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_weights(torch.nn.Linear(2, 2), bad)


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ckpt.save_last(path, {"epoch": 1, "w": torch.ones(3)})

    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_last(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = ckpt.load_last(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_written_files_get_normal_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.parametrize(
    "name", sorted(set(available_losses()) - {"iou", "hybrid", "unetpp_hybrid", "cross_entropy"})
)
def test_every_loss_is_finite_on_an_all_background_batch(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 64, 64, requires_grad=True)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    loss = DeepSupervisionLoss(get_loss(name, 4), 4)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_metrics_of_empty_masks_are_not_nan():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long))
    assert cm.miou() == 1.0  # only background, predicted right; absent classes are excluded, not NaN
    assert np.isnan(cm.iou()[1:]).all()


def test_out_of_memory_gives_a_hint_not_a_traceback(synthetic_data, tmp_path, monkeypatch, capsys):
    import competition.train.loop as train_module

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module.FoldRun, "train_epoch", oom)
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tiny_config_dict(synthetic_data, tmp_path)))
    assert main(["train", "--config", str(config), "--fold", "0"]) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "train.batch_size" in err and "accum_steps" in err


def test_cli_reports_config_errors_with_the_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("name: x\ndata: {root: d, annotations: a.json, folds: f.csv}\ntrain: {batchsize: 4}\n")
    assert main(["train", "--config", str(config)]) == 1
    assert "train.batchsize: unknown key. Did you mean 'batch_size'" in capsys.readouterr().err
    config.write_text("name: x\n  bad: [yaml\n")
    assert main(["train", "--config", str(config)]) == 1
    assert "not valid YAML" in capsys.readouterr().err
