import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
import yaml

from competition.core import checkpoint as ckpt
from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict
from competition.core.io import OutputExistsError
from competition.core.runtime import collate
from competition.data.splits import build_datasets
from competition.predictions.oof import decode_probs
from competition.train.loop import NonFiniteLossError, evaluate, train_fold
from smp_unet3p.losses import DeepSupervisionLoss, get_loss
from tests.conftest import tiny_config_dict


def test_run_directory_holds_every_promised_file(trained_run):
    cfg, results = trained_run
    assert [r.fold for r in results] == [0, 1]
    for r in results:
        files = {p.name for p in r.run_dir.iterdir()}
        assert {
            "config.yaml",
            "metrics.csv",
            "curves.png",
            "best.safetensors",
            "best.json",
            "last.ckpt",
            "oof.npz",
        } <= files
        metrics = pd.read_csv(r.run_dir / "metrics.csv")
        assert list(metrics["epoch"]) == [1, 2]
        assert {"train_loss", "val_loss", "miou", "lr", "seconds", "iou_Background", "iou_Clothing"} <= set(
            metrics
        )
        meta = json.loads((r.run_dir / "best.json").read_text())
        assert meta["miou"] == pytest.approx(metrics["miou"].max())
        assert meta["epoch"] == int(metrics.loc[metrics["miou"].idxmax(), "epoch"])
        state = torch.load(r.run_dir / "last.ckpt", weights_only=True)
        assert state["epoch"] == 2 and {"optimizer", "scheduler", "scaler", "rng"} <= set(state)


def test_a_few_steps_lower_the_loss(synthetic_data, tmp_path):
    cfg = config_from_dict(tiny_config_dict(synthetic_data, tmp_path, epochs=4, batch_size=2, oof="none"))
    result = train_fold(cfg, 0)
    losses = result.metrics["train_loss"].to_numpy()
    assert losses[-1] < 0.7 * losses[0], losses


def test_best_checkpoint_round_trip_reproduces_its_score(trained_run):
    cfg, results = trained_run
    run_dir = results[0].run_dir
    model, saved_cfg, meta = ckpt.load_fold_model(run_dir)
    assert saved_cfg == cfg and not model.training
    _, val, names = build_datasets(cfg, 0)
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=collate)
    criterion = DeepSupervisionLoss(get_loss("dice_ce", len(names)), len(names))
    _, matrix = evaluate(model, loader, criterion, len(names), torch.device("cpu"), cfg)
    assert matrix.miou() == pytest.approx(meta["miou"], abs=1e-6)


def test_oof_file_covers_the_validation_fold(trained_run):
    cfg, results = trained_run
    folds = pd.read_csv(cfg.data.folds)
    for r in results:
        with np.load(r.run_dir / "oof.npz") as oof:
            ids = sorted(oof["image_ids"].tolist())
            assert ids == sorted(str(i) for i in folds.loc[folds["fold"] == r.fold, "image_id"])
            levels = oof[f"pred__{ids[0]}"]  # uint8 levels p x 255
            assert levels.dtype == np.uint8 and levels.shape == (11, 64, 64)
            assert np.allclose(decode_probs(levels).sum(0), 1.0, atol=11 * 1.5 / 255)
            assert oof[f"target__{ids[0]}"].shape == (64, 64)


def test_existing_run_is_not_overwritten(trained_run):
    cfg, _ = trained_run
    with pytest.raises(OutputExistsError, match="--resume"):
        train_fold(cfg, 0)


def test_resume_after_a_kill_matches_an_uninterrupted_run(synthetic_data, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path / "a", epochs=3, oof="none", ema_decay=0.9)
    whole = train_fold(config_from_dict(raw), 1)

    raw["output_dir"] = str(tmp_path / "b")
    cfg = config_from_dict(raw)

    def kill(epoch, row):
        if epoch == 0:
            raise KeyboardInterrupt  # as if the job were killed after epoch 1's files were written

    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 1, on_epoch_end=kill)
    resumed = train_fold(cfg, 1, resume=True)
    columns = ["epoch", "train_loss", "val_loss", "miou", "lr"]
    pd.testing.assert_frame_equal(resumed.metrics[columns], whole.metrics[columns], rtol=1e-5)
    a = safetensors.torch.load_file(str(whole.run_dir / "best.safetensors"))
    b = safetensors.torch.load_file(str(resumed.run_dir / "best.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_resume_refuses_a_changed_config(synthetic_data, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path, epochs=1, oof="none")
    train_fold(config_from_dict(raw), 0)
    raw["model"]["params"]["decoder_cat_channels"] = 16
    with pytest.raises(ConfigError, match=r"model\.params"):
        train_fold(config_from_dict(raw), 0, resume=True)


def test_nan_loss_stops_with_epoch_and_step_and_saves_nothing(synthetic_data, tmp_path, monkeypatch):
    import competition.train.optim as train_module  # where the loss is built (build_criterion)

    def nan_loss(name, classes, ignore_index, class_weights=None):
        return lambda logits, target: logits.sum() * float("nan")

    monkeypatch.setattr(train_module, "get_loss", nan_loss)
    cfg = config_from_dict(tiny_config_dict(synthetic_data, tmp_path))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1 of fold 0"):
        train_fold(cfg, 0)
    assert not (cfg.run_dir(0) / "best.safetensors").exists()
    assert not (cfg.run_dir(0) / "last.ckpt").exists()

    skip = config_from_dict(
        tiny_config_dict(synthetic_data, tmp_path / "skip", nan_policy="skip", max_skipped_steps=1)
    )
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1 of fold 0 \(2 consecutive"):
        train_fold(skip, 0)


def test_checkpoint_of_another_model_is_a_clear_error(trained_run):
    cfg, results = trained_run
    from competition.core.runtime import build_model

    other = build_model(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"classes": None})}), 5, False
    )
    with pytest.raises(ckpt.CheckpointError, match="class count"):
        ckpt.load_weights(other, results[0].run_dir / "best.safetensors")


def test_resume_checkpoint_never_runs_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"epoch": 1, "x": Evil()}, tmp_path / "last.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.load_last(tmp_path / "last.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_ddp_two_gloo_processes_write_the_same_outputs(synthetic_data, trained_run, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path, epochs=1)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "competition.cli", "train", "--config", str(config), "--fold", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "tiny" / "fold0"
    single = trained_run[1][0].run_dir
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in single.iterdir()}
    ddp_metrics, one_metrics = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(single / "metrics.csv")
    assert list(ddp_metrics.columns) == list(one_metrics.columns)
    assert len(ddp_metrics) == 1 and np.isfinite(ddp_metrics["train_loss"]).all()
    assert "fold 0: best mIoU" in done.stdout


def test_bf16_autocast_channels_last_accumulation_and_ema_train_cleanly(synthetic_data, tmp_path):
    raw = tiny_config_dict(
        synthetic_data, tmp_path, epochs=1, batch_size=2, accum_steps=2, amp="bf16", channels_last=True,
        ema_decay=0.5, oof="argmax", oof_size=32,
    )  # fmt: skip
    result = train_fold(config_from_dict(raw), 0)
    row = result.metrics.iloc[0]
    assert np.isfinite([row["train_loss"], row["val_loss"], row["miou"]]).all()
    assert json.loads((result.run_dir / "best.json").read_text())["ema"] is True
    with np.load(result.run_dir / "oof.npz") as oof:
        key = oof["image_ids"][0]
        assert oof[f"pred__{key}"].dtype == np.uint8 and oof[f"pred__{key}"].shape == (32, 32)
