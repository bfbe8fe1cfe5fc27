"""The CamVid recipe (issue 23): random scale around the eval size, keeping the last epoch's weights, and the
shipped ``camvid_lite0`` config on the real annotations (skipped without ../shared/data)."""

import json

import numpy as np
import pandas as pd
import pytest

from competition.core.config import AugmentConfig, ConfigError
from competition.core.config_file import config_from_dict, load_config
from competition.data.classes import IGNORE_INDEX, ClassMap
from competition.data.coco import load_coco, rasterize
from competition.data.transforms import build_train_transform
from competition.predictions.provenance import config_hash
from tests.conftest import tiny_config_dict


def _sizes(aug: AugmentConfig, shape=(360, 480), draws=200) -> np.ndarray:
    tf = build_train_transform(aug)
    tf.set_random_seed(0)
    image, mask = np.zeros((*shape, 3), np.uint8), np.zeros(shape, np.uint8)
    return np.array([tf(image=image, mask=mask)["mask"].shape for _ in range(draws)])


def test_scale_resizes_training_images_around_the_eval_size_before_the_crop():
    plain = _sizes(AugmentConfig(hflip=0), draws=3)
    assert (plain == (360, 480)).all()  # no scale: the images' own size, as before
    at_eval = _sizes(AugmentConfig(hflip=0, eval_size=[60, 80], scale=[1, 1]), draws=3)
    assert (at_eval == (60, 80)).all()
    ranged = _sizes(AugmentConfig(hflip=0, eval_size=[60, 80], scale=[0.5, 2.0]))
    factors = ranged[:, 0] / 60
    assert factors.min() >= 0.5 and factors.max() <= 2.0 and factors.max() - factors.min() > 1.0
    np.testing.assert_allclose(ranged[:, 1] / ranged[:, 0], 80 / 60, atol=0.03)  # the aspect ratio kept
    cropped = _sizes(AugmentConfig(hflip=0, size=[32, 48], eval_size=[60, 80], scale=[0.5, 2.0]))
    assert (cropped == (32, 48)).all()  # smaller draws are padded (with ignore) to the crop
    own = _sizes(AugmentConfig(hflip=0, scale=[0.5, 0.5]), draws=2)
    assert (own == (180, 240)).all()  # without eval_size: around the image's own size
    with pytest.raises(ValueError, match="low <= high"):
        AugmentConfig(scale=[2.0, 1.0])


def test_keep_last_holds_the_last_epochs_weights_whatever_its_score(synthetic_data, tmp_path, monkeypatch):
    import itertools

    from competition.core import checkpoint as ckpt
    from competition.core.metrics import ConfusionMatrix
    from competition.train.loop import train

    kept = {}
    for keep in ("best", "last"):
        scores = itertools.chain([0.9, 0.5], itertools.repeat(0.1))  # every epoch scores worse than the first
        monkeypatch.setattr(ConfusionMatrix, "miou", lambda self, s=scores: next(s))
        cfg = config_from_dict(
            tiny_config_dict(synthetic_data, tmp_path / keep, epochs=3, keep=keep, oof="none")
        )
        train(cfg, "0")
        kept[keep] = ckpt.read_best_meta(cfg.run_dir(0))["epoch"]
    assert kept == {"best": 1, "last": 3}
    default = config_from_dict(tiny_config_dict(synthetic_data, tmp_path))
    unchanged = tiny_config_dict(synthetic_data, tmp_path)
    unchanged["train"] |= {"keep": "best"}
    unchanged["augment"] |= {"scale": None}
    unchanged["data"] |= {"background": "auto"}
    assert config_hash(config_from_dict(unchanged)) == config_hash(default)  # old runs keep their hash


def test_the_camvid_recipe_reads_the_real_annotations_without_a_background(shared_data, tmp_path):
    camvid = shared_data / "camvid"
    if not (camvid / "train_all.json").is_file():
        pytest.skip("no CamVid in ../shared/data")
    overrides = [f"data.root={camvid}", f"data.annotations={camvid / 'train_all.json'}"]
    overrides += [f"data.folds={tmp_path / 'folds.csv'}", "model.encoder_weights=null"]
    cfg = load_config("camvid_lite0", overrides)
    assert cfg.data.background_index() is None and len(cfg.data.classes) == 11
    coco = load_coco(cfg.data.annotations, cfg.data.root)
    class_map = ClassMap.build(coco.categories, cfg.data.classes, background=False)
    assert sorted(class_map.category_to_class.values()) == list(range(11))
    info = next(iter(coco.images.values()))
    mask = rasterize(
        coco.annotations[info.id], info.height, info.width, class_map.category_to_class, fill=255
    )
    assert mask.shape == (360, 480)
    assert set(np.unique(mask)) <= set(range(11)) | {IGNORE_INDEX}
    assert 0 < (mask == IGNORE_INDEX).mean() < 0.2  # void is a small part of a frame
    splits = pd.read_csv(camvid / "splits.csv")
    assert set(splits["split"]) == {"train", "val"}  # the test split is held out
    names = {i["file_name"] for i in json.loads((camvid / "train_all.json").read_text())["images"]}
    assert set(splits["file_name"]) == names
    with pytest.raises(ConfigError, match="cgm_background"):
        load_config("camvid_lite0", [*overrides, "model.params.cgm_background=0"])


def test_swa_keeps_the_average_of_the_last_epochs_and_resumes_exactly(synthetic_data, tmp_path):
    import safetensors.torch
    import torch

    from competition.train.loop import FoldRun, train_fold

    raw = tiny_config_dict(synthetic_data, tmp_path / "a", epochs=3, oof="none", swa_epochs=2, keep="last")
    run, weights = FoldRun(config_from_dict(raw), 1), []
    run.run(lambda epoch, row: weights.append({k: v.clone() for k, v in run.model.state_dict().items()}))
    kept = safetensors.torch.load_file(str(run.run_dir / "best.safetensors"))
    floats = [k for k, v in weights[0].items() if v.is_floating_point()]
    for key in floats:  # epochs 2 and 3 averaged, epoch 1 not
        torch.testing.assert_close(kept[key], (weights[1][key] + weights[2][key]) / 2, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(kept[k], weights[2][k]) for k in floats)
    metrics = pd.read_csv(run.run_dir / "metrics.csv")

    raw["output_dir"] = str(tmp_path / "b")
    cfg = config_from_dict(raw)

    def kill(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt  # inside the window: one epoch averaged so far

    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 1, on_epoch_end=kill)
    resumed = train_fold(cfg, 1, resume=True)
    columns = ["epoch", "train_loss", "val_loss", "miou"]
    pd.testing.assert_frame_equal(resumed.metrics[columns], metrics[columns], rtol=1e-5)
    again = safetensors.torch.load_file(str(resumed.run_dir / "best.safetensors"))
    assert all(torch.allclose(again[k].float(), kept[k].float(), atol=1e-5) for k in kept)
