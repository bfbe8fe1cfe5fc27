"""No silent wrong results: the output contract, files that must belong together, resume, DDP agreement,
one route to the submission, and what a user sees (warnings, panels). Each test failed on the code before."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from competition.cli import main
from competition.core import checkpoint as ckpt
from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict
from competition.core.runtime import to_probs
from competition.data.splits import FoldsMismatchError, build_datasets
from competition.inference.ensemble import read_prob_files
from competition.inference.predictor import Ensemble, ModelSpec, load_specs
from competition.oof.scores import evaluate_oof
from competition.oof.weights import search_weights
from competition.predictions.submission import mask_from_probs
from competition.train.loop import FoldRun, evaluate, train_fold
from tests.conftest import fake_oof_run, onehot, tiny_config_dict


# ------------------------------------------------------------------------------------ 1. output contract
def test_output_changing_model_params_are_refused_with_the_reason(synthetic_data, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["model"]["params"]["activation"] = "softmax"
    with pytest.raises(ConfigError, match=r"model\.params.*activation.*needs logits"):
        config_from_dict(raw)
    raw["model"]["params"]["activation"] = None  # explicit None is the default: fine
    assert config_from_dict(raw).model.params["activation"] is None


def test_to_probs_is_softmax_or_two_channel_sigmoid():
    logits = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]])  # [1, 3, 1, 1]
    torch.testing.assert_close(to_probs(logits), logits.softmax(1))
    torch.testing.assert_close(to_probs((logits, torch.zeros(1, 3))), logits.softmax(1))  # smp aux tuple
    one = torch.tensor([[[[0.0, 2.0]]]])  # [1, 1, 1, 2]
    p = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(to_probs(one, classes=2)[0, :, 0, 1], torch.stack([1 - p, p]))
    assert to_probs(one).argmax(1).tolist() == [[[0, 1]]]  # a 1-channel model's argmax is its class
    with pytest.raises(ValueError, match="3 channels for 4 classes"):
        to_probs(logits, classes=4)


# -------------------------------------------------------------------------- 2. class lists in every file
def test_oof_runs_of_other_class_order_are_refused_naming_both_lists(tmp_path):
    target = np.array([[0, 1], [2, 2]])
    item = {"7": (onehot(target, 3), target)}
    a = fake_oof_run(tmp_path, "a", {0: item}, ["bg", "Paper", "Glass"])
    b = fake_oof_run(tmp_path, "b", {0: item}, ["bg", "Glass", "Paper"])
    with pytest.raises(ckpt.CheckpointError, match=r"\['bg', 'Paper', 'Glass'\].*\['bg', 'Glass', 'Paper'\]"):
        evaluate_oof([a, b])


def test_probability_files_of_other_classes_or_without_names_are_refused(tmp_path):
    probs = onehot(np.zeros((2, 2)), 3)
    images = {"image_ids": np.array(["1"]), "file_names": np.array(["a.png"]), "sizes": np.array([[2, 2]])}
    np.savez(tmp_path / "a.npz", pred__1=probs, class_names=np.array(["bg", "x", "y"]), **images)
    np.savez(tmp_path / "b.npz", pred__1=probs, class_names=np.array(["bg", "y", "x"]), **images)
    np.savez(tmp_path / "old.npz", pred__1=probs, **images)
    wanted = [("a.png", (2, 2))]
    with pytest.raises(ckpt.CheckpointError, match="class lists differ"):
        read_prob_files([tmp_path / "a.npz", tmp_path / "b.npz"], wanted, "test.json")
    with pytest.raises(ckpt.CheckpointError, match="carries no class_names"):
        read_prob_files([tmp_path / "a.npz", tmp_path / "old.npz"], wanted, "test.json")
    files = read_prob_files([tmp_path / "a.npz", tmp_path / "a.npz"], wanted, "test.json")
    key, maps = next(files.iterate())
    assert files.class_names == ["bg", "x", "y"] and key == "1" and len(maps) == 2
    assert np.allclose(maps[1], probs) and files.blocks == [None, None]  # written before provenance


# --------------------------------------------------------------------- 3. folds belong to their data
def test_a_folds_file_of_another_json_is_refused(synthetic_data, tmp_path):
    table = pd.read_csv(synthetic_data["folds"])
    table["file_name"] = table["file_name"].iloc[::-1].to_numpy()  # same ids, other images
    other = tmp_path / "other_folds.csv"
    table.to_csv(other, index=False)
    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["data"]["folds"] = str(other)
    with pytest.raises(FoldsMismatchError, match="name other files"):
        build_datasets(config_from_dict(raw), 0)
    table.drop(columns="file_name").to_csv(other, index=False)
    with pytest.raises(FoldsMismatchError, match="no file_name column"):
        build_datasets(config_from_dict(raw), 0)
    table.assign(image_id=table["image_id"] + 1000).to_csv(other, index=False)
    with pytest.raises(FoldsMismatchError, match="does not have"):
        build_datasets(config_from_dict(raw), 0)


def test_folder_ids_stay_text(tmp_path):
    import cv2

    for d in ("image", "label"):
        (tmp_path / d).mkdir()
    for stem in ("001", "002", "010"):
        cv2.imwrite(str(tmp_path / "image" / f"{stem}.png"), np.zeros((32, 32, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "label" / f"{stem}.png"), np.zeros((32, 32), np.uint8))
    pd.DataFrame({"image_id": ["001", "002", "010"], "fold": [0, 1, 1]}).to_csv(
        tmp_path / "f.csv", index=False
    )
    raw = {
        "name": "folder",
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "format": "folder",
            "image_dir": str(tmp_path / "image"),
            "mask_dir": str(tmp_path / "label"),
        },
        "model": {"encoder_name": "resnet18"},
    }
    raw["data"]["folds"] = str(tmp_path / "f.csv")
    train, val, names = build_datasets(config_from_dict(raw), 1)
    assert train.stems == ["001"] and val.stems == ["002", "010"] and names == ["background", "foreground"]
    assert val[1]["image_id"] == "010"


# ---------------------------------------------------------------- 4. predict at the validation scale
def test_ensemble_predicts_each_model_at_its_eval_size(trained_run, tmp_path):
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    probs = Ensemble([ModelSpec(Recorder(), None, None, input_size=(32, 64))])(torch.rand(1, 3, 64, 48))
    assert seen == [(32, 64)] and probs.shape == (1, 2, 64, 48)

    cfg, results = trained_run
    fold = tmp_path / "fold0"
    shutil.copytree(results[0].run_dir, fold)
    saved = yaml.safe_load((fold / "config.yaml").read_text())
    saved["augment"]["eval_size"] = 32
    (fold / "config.yaml").write_text(yaml.safe_dump(saved))
    specs, _ = load_specs([fold])
    assert specs[0].input_size == (32, 32)  # a side: square
    saved["augment"]["eval_size"] = [32, 64]  # [height, width] for non-square frames
    (fold / "config.yaml").write_text(yaml.safe_dump(saved))
    assert load_specs([fold])[0][0].input_size == (32, 64)


def test_predict_pads_inputs_to_the_models_output_stride_as_validation_does(trained_run, monkeypatch):
    cfg, results = trained_run
    specs, _ = load_specs([results[0].run_dir])
    assert specs[0].multiple == 32  # the tiny model's encoder: stride 32
    encoder = type(specs[0].model.encoder)
    monkeypatch.setattr(encoder, "output_stride", property(lambda self: 16), raising=False)
    assert load_specs([results[0].run_dir])[0][0].multiple == 16  # e.g. encoder_depth=4


# ------------------------------------------------------------------ 5. resume keeps the better best
def test_resume_never_replaces_a_better_best_checkpoint(synthetic_data, tmp_path):
    cfg = config_from_dict(
        tiny_config_dict(synthetic_data, tmp_path, epochs=4, checkpoint_every=2, oof="none")
    )

    def kill(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt  # epoch 3's files are written, last.ckpt still holds epoch 2

    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, on_epoch_end=kill)
    run_dir = cfg.run_dir(0)
    meta = json.loads((run_dir / "best.json").read_text())
    meta.update(miou=0.99, epoch=3)  # a best that the re-run epochs cannot reach
    (run_dir / "best.json").write_text(json.dumps(meta))
    before = (run_dir / "best.safetensors").read_bytes()
    result = train_fold(cfg, 0, resume=True)
    assert (run_dir / "best.safetensors").read_bytes() == before
    assert json.loads((run_dir / "best.json").read_text())["miou"] == 0.99
    assert result.best_miou == 0.99 and result.best_epoch == 3


# -------------------------------------------------------------- 6. validation loss on ungated logits
def test_validation_loss_uses_ungated_logits(synthetic_data, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["model"]["params"]["cgm_gate"] = "hard"
    cfg = config_from_dict(raw)
    from competition.core.runtime import build_model
    from competition.train.loop import build_criterion

    model = build_model(cfg, 3).eval()
    with torch.no_grad():
        model.cgm[1].bias.fill_(-50.0)  # every class "absent": hard gate offsets foreground by -1e4
    images, masks = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    criterion = build_criterion(cfg, 3)
    loss, matrix = evaluate(model, [{"image": images, "mask": masks}], criterion, 3, torch.device("cpu"), cfg)
    with torch.no_grad():
        raw_out = model.raw_outputs(images)
        assert torch.equal(model.finalize(raw_out), model(images))
        expected = criterion(raw_out, masks).item()
        gated = criterion(model(images), masks).item()
    assert loss == pytest.approx(expected, rel=1e-5) and gated > 100 * expected
    assert matrix.matrix[:, 1:].sum() == 0  # the metric still sees the gated prediction: background only


# ---------------------------------------------------------- 7. fold labels, ignore_index, nested score
def test_oof_fold_labels_come_from_best_json_and_ignore_index_from_the_files(tmp_path):
    target = np.array([[1, 1], [0, 1]])
    pred = onehot(np.ones((2, 2), np.int64), 2)  # wrong only on the pixel of class 0, ignored by this run
    run = fake_oof_run(tmp_path, "r", {2: {"a": (pred, target)}, 10: {"b": (pred, target)}}, ["bg", "x"], 0)
    table = evaluate_oof([run]).set_index("folds")
    assert sorted(table.index) == ["all folds", "fold10", "fold2"]  # not fold0/fold1 by sorted folder names
    assert table.loc["fold10", "miou"] == 1.0  # the ignored pixel is not counted


def test_searched_weights_get_a_nested_score_from_folds_they_were_not_chosen_on(tmp_path):
    ones = np.ones((4, 4), np.int64)
    good, bad = onehot(ones, 2, 0.9), onehot(0 * ones, 2, 0.99)
    a = fake_oof_run(tmp_path, "a", {0: {"p": (good, ones)}, 1: {"q": (bad, ones)}}, ["bg", "x"])
    b = fake_oof_run(tmp_path, "b", {0: {"p": (bad, ones)}, 1: {"q": (good, ones)}}, ["bg", "x"])
    found = search_weights([a, b], step=0.5)
    assert found.fold_weights[0].tolist() == [0.0, 1.0] and found.fold_weights[1].tolist() == [1.0, 0.0]
    assert found.in_sample == pytest.approx(0.25) and found.nested == pytest.approx(0.0)


# ----------------------------------------------------------------- 8. DDP ranks agree on a NaN loss
NAN_ON_RANK1 = """
import os, sys
import competition.train.loop as t
from competition.core.config_file import load_config
real, calls = t.build_criterion, []
def build_criterion(cfg, classes):
    loss = real(cfg, classes)
    def nan_on_rank1(output, target):
        calls.append(1)
        bad = os.environ["RANK"] == "1" and len(calls) <= {bad_steps}
        return loss(output, target) * (float("nan") if bad else 1.0)
    return nan_on_rank1
t.build_criterion = build_criterion
try:
    t.train_fold(load_config({config!r}), 0)
except t.NonFiniteLossError as exc:
    with open(os.path.join({out!r}, "stopped" + os.environ["RANK"]), "w") as f:
        f.write(str(exc))
    sys.exit(3)
"""


def run_two_ranks(script: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "ddp_script.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)  # a hang fails here


def test_ddp_ranks_stop_together_when_one_rank_sees_a_nan(synthetic_data, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(synthetic_data, tmp_path, epochs=1)))
    done = run_two_ranks(
        NAN_ON_RANK1.format(bad_steps=10**6, config=str(config), out=str(tmp_path)), tmp_path
    )
    assert done.returncode != 0
    stopped = {
        r: (tmp_path / f"stopped{r}").read_text() for r in (0, 1) if (tmp_path / f"stopped{r}").exists()
    }
    assert sorted(stopped) == [0, 1], done.stderr[-3000:]
    assert "non-finite on another rank" in stopped[0] and "loss is nan" in stopped[1]
    assert not (tmp_path / "tiny" / "fold0" / "best.safetensors").exists()

    # nan_policy=skip: both ranks skip the same micro-batch (no backward, no step) and train on
    raw = tiny_config_dict(synthetic_data, tmp_path / "skip", epochs=1, nan_policy="skip", oof="none")
    config.write_text(yaml.safe_dump(raw))
    done = run_two_ranks(NAN_ON_RANK1.format(bad_steps=1, config=str(config), out=str(tmp_path)), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "non-finite loss at epoch 1, step 1 of fold 0; micro-batch skipped" in done.stdout + done.stderr
    assert (tmp_path / "skip" / "tiny" / "fold0" / "best.safetensors").exists()


# ---------------------------------------------------------- 9. one route to the submission mask
def test_mask_from_probs_resizes_probabilities_before_the_argmax():
    probs = torch.zeros(2, 2, 2)
    probs[1] = torch.tensor([[0.55, 0.2], [0.2, 0.2]])
    probs[0] = 1 - probs[1]
    mask = mask_from_probs(probs, 4)
    resized = F.interpolate(probs[None], size=(4, 4), mode="bilinear", align_corners=False)[0]
    assert mask.tolist() == resized.argmax(0).tolist()
    assert mask.sum() == 1  # nearest-resizing the 2x2 argmax would give a whole 2x2 block of class 1


def test_predict_and_ensemble_of_its_probabilities_write_the_same_csv(trained_run, synthetic_data, tmp_path):
    cfg, _ = trained_run
    root, test = str(synthetic_data["root"]), str(synthetic_data["test"])
    out, probs = tmp_path / "direct.csv", tmp_path / "p.npz"
    args = ["predict", "--runs", str(cfg.output_dir / cfg.name), "--data-root", root, "--test", test]
    args += ["--out", str(out), "--workers", "0", "--save-probs", str(probs), "--overlays", "0"]
    assert main(args) == 0  # 64 px images, probabilities saved at 256 and the CSV at 256
    again = tmp_path / "ensembled.csv"
    assert main(["ensemble", "--probs", str(probs), "--test", test, "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()


# ------------------------------------------------------------------- 10. no host syncs in the step
def test_a_training_step_reads_nothing_back_but_the_finite_check(synthetic_data, tmp_path, monkeypatch):
    """Reads of tensor values (``item``, ``float``, ``bool``) made by our own code during one epoch: each is
    a host-device sync on a GPU. torch's own CPU bookkeeping (optimizer step counters, loader seeds) is not
    ours and not counted."""
    import competition.train.loop as train_module

    cfg = config_from_dict(tiny_config_dict(synthetic_data, tmp_path, batch_size=2, progress=True))
    run = FoldRun(cfg, 0)
    import competition
    import smp_unet3p

    ours = (str(Path(competition.__file__).parent), str(Path(smp_unet3p.__file__).parent))
    reads = {"item": 0, "float": 0, "bool": 0}

    def count(name, real):
        def wrapper(self, *args):
            reads[name] += sys._getframe(1).f_code.co_filename.startswith(ours)
            return real(self, *args)

        return wrapper

    monkeypatch.setattr(train_module, "PROGRESS_EVERY", 1000)
    for name, attr in (("item", "item"), ("float", "__float__"), ("bool", "__bool__")):
        monkeypatch.setattr(torch.Tensor, attr, count(name, getattr(torch.Tensor, attr)))
    run.train_epoch(run.model, 0)
    steps = len(run.train_loader)
    assert steps >= 3
    # the finite check each step, one progress-bar read at step 0, the epoch mean. The old loop also read
    # every loss term of every output (~10 floats a step with Dice+CE and deep supervision).
    assert reads == {"item": 1, "float": 1, "bool": steps}


# -------------------------------------------------------------------------- 11. grouping on real layouts
def test_fewer_groups_than_folds_says_what_to_do_and_a_groups_file_works(synthetic_data, tmp_path):
    from competition.data.classes import ClassMap
    from competition.data.coco import load_coco
    from competition.data.folds import build_folds, read_groups

    coco = load_coco(synthetic_data["train"], synthetic_data["root"])
    class_map = ClassMap.build(coco.categories)
    folders = {f.split("/")[0] for f in (i.file_name for i in coco.images.values())}
    with pytest.raises(
        ValueError, match=rf"{len(folders)} groups .* use --k {len(folders)} or fewer.*--groups"
    ):
        build_folds(coco, class_map, len(folders) + 1, group_by_folder=True)
    files = [i.file_name for i in coco.images.values()]
    groups = pd.DataFrame({"file_name": files, "group": [f"scene{i // 2}" for i in range(len(files))]})
    groups.to_csv(tmp_path / "groups.csv", index=False)
    table = build_folds(coco, class_map, 3, groups=read_groups(tmp_path / "groups.csv"))
    assert table.groupby("group")["fold"].nunique().max() == 1 and table["fold"].nunique() == 3
    groups.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match="no group for 1 images"):
        build_folds(coco, class_map, 3, groups=read_groups(tmp_path / "short.csv"))


# --------------------------------------------------------------------- 12. warnings as short lines
def test_cli_warnings_are_short_lines_naming_the_item(tmp_path, capsys):
    image = {"id": 1, "file_name": "a.png", "height": 8, "width": 8}
    square = [[0, 0, 4, 0, 4, 4, 0, 4]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square},
        {"id": 2, "image_id": 99, "category_id": 1, "segmentation": square},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 1, 1]]},
    ]
    coco = {"images": [image], "annotations": anns, "categories": [{"id": 1, "name": "Paper"}]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))  # prepare checks the images exist
    args = ["prepare", "--data-root", str(tmp_path), "--annotations", str(tmp_path / "train.json")]
    assert main([*args, "--classes", "Background,Paper", "--workers", "1", "--overlays", "0"]) == 0
    err = [line.strip() for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "warning: train.json: annotation 2: unknown image_id 99" in err
    assert any(line.startswith("warning: train.json: annotation 3 (image 1, a.png):") for line in err)
    assert any(line.endswith("2 annotation problems (unknown image: 1, bad segmentation: 1)") for line in err)
    assert not any("UserWarning" in line or ".py:" in line for line in err), err  # no source path or code


# ------------------------------------------------------------------------ 13. readable overlay panels
def test_panels_are_side_by_side_at_a_readable_size_with_the_class_colours(tmp_path):
    from PIL import Image

    from competition.data.panels import palette, save_panels

    image = np.full((64, 64, 3), 128, np.uint8)
    label = np.zeros((64, 64), np.uint8)
    label[8:40, 8:40] = 2
    pred = np.zeros_like(label)
    pred[30:60, 30:60] = 1
    path = save_panels(tmp_path / "p.png", image, [("label", label), ("prediction", pred)], ["bg", "a", "b"])
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] == 3 * 360 and picture.shape[0] >= 360  # three panels, 360 px each
    colours = palette(3)
    for c in (1, 2):  # each class shows in its legend patch (pure colour, not blended)
        assert (np.abs(picture.astype(int) - colours[c]).sum(-1) < 6).sum() > 20
