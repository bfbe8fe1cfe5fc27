"""Issue 20, inputs read as they are: copy-paste pastes what is visible (7), tracking follows the run's
identity (10), parameters belong to their architecture (11), masks are read as they are (13)."""

import json
import warnings

import cv2
import numpy as np
import pytest
import torch

from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict
from competition.data.classes import ClassMap
from competition.data.coco import MaskCache, load_coco
from competition.data.copy_paste import CopyPaste
from competition.data.datasets import MaskFolderDataset
from competition.data.splits import build_datasets
from competition.train.loop import train, train_fold
from smp_unet3p import Unet3Plus, create_model
from tests.conftest import tiny_config_dict


# ------------------------------------------------------------------ 7. copy-paste pastes what is visible
def _covered_object(tmp_path):
    """A red 12x12 object (class 1) partly covered by a green 4x4 object (class 2) drawn on top of it."""
    image = np.zeros((24, 24, 3), np.uint8)
    image[4:16, 4:16] = (220, 20, 20)
    image[6:10, 6:10] = (20, 220, 20)
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    big, small = [4, 4, 16, 4, 16, 16, 4, 16], [6, 6, 10, 6, 10, 10, 6, 10]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 24, "width": 24}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [big], "area": 144.0,
             "bbox": [4, 4, 12, 12], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [small], "area": 16.0,
             "bbox": [6, 6, 4, 4], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}],
    }  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(coco))
    coco = load_coco(tmp_path / "c.json", tmp_path)
    class_map = ClassMap.build(coco.categories, ["bg", "red", "green"])
    cache = MaskCache(coco, class_map, tmp_path / "cache")
    cache.build(workers=1, progress=False)
    return coco, class_map, cache


def test_copy_paste_pastes_only_the_visible_pixels_of_an_instance(tmp_path):
    coco, class_map, cache = _covered_object(tmp_path)
    paste = CopyPaste(coco, class_map.category_to_class, tmp_path, [1], p=1.0, max_objects=1, scale=(1, 1),
                      balanced=False, mask_path=cache.mask_path)  # fmt: skip
    big = next(n for n, (_, _, cls) in enumerate(paste.instances) if cls == 1)
    image, region, cls = paste.patch(big)
    assert cls == 1 and region.sum() == 144 - 16  # the covered 4x4 is not the big object's
    assert (image[region] == (220, 20, 20)).all()
    seen = 0
    for seed in range(20):  # pasted onto a grey image: every pixel labelled red is red
        target = np.full((24, 24, 3), 128, np.uint8)
        out, mask = paste(target, np.zeros((24, 24), np.uint8), np.random.default_rng(seed))
        seen += int((mask == 1).any())
        assert (out[mask == 1] == (220, 20, 20)).all() and (out[mask == 2] == (20, 220, 20)).all()
    assert seen > 0
    blind = CopyPaste(coco, class_map.category_to_class, tmp_path, [1], p=1.0)  # no mask cache: whole polygon
    assert blind.patch(big)[1].sum() == 144


# ------------------------------------------------------------- 10. tracking follows the run's identity
def test_overwrite_starts_new_tracked_runs_and_resume_logs_each_epoch_once(
    synthetic_data, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    raw = tiny_config_dict(synthetic_data, tmp_path / "runs", epochs=2)
    loggers = ["train.loggers=[csv,tensorboard,mlflow,wandb]", "train.checkpoint_every=2"]
    cfg = config_from_dict(raw, loggers)

    def interrupt(epoch, row):
        raise KeyboardInterrupt  # after epoch 1 was logged, before any checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, on_epoch_end=interrupt)
    run_dir = cfg.run_dir(0)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'mlflow.db'}")
    first = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    # resume with a value a resume may change: epoch 1 is re-run from scratch and must not be logged twice
    train(config_from_dict(raw, [*loggers, "train.workers=1"]), "0", resume=True)
    assert [m.step for m in client.get_metric_history(first, "miou")] == [1, 2]
    run = client.get_run(first)
    assert run.data.params["train.workers"] == "0" and run.info.status == "FINISHED"
    assert run.data.tags["changed_on_resume.train.workers"] == "0 -> 1"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("miou")] == [1, 2]

    train(cfg, "0", overwrite=True)  # a fresh run: new tracked runs, no old events
    second = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert second != first
    assert [m.step for m in client.get_metric_history(second, "miou")] == [1, 2]
    assert [m.step for m in client.get_metric_history(first, "miou")] == [1, 2]  # the old run untouched
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("miou")] == [1, 2]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


# ------------------------------------------------------------- 11. parameters belong to their architecture
def test_model_params_are_checked_against_the_architecture(synthetic_data, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"\['cgm', 'cgm_gate', 'decoder_cat_channels'\] not parameters of DSUnet\.",  # DS is accepted
    ):
        config_from_dict(raw, ["model.arch=unet"])
    raw["model"]["params"] = {"deep_supervison": True}
    with pytest.raises(ConfigError, match=r"not parameters of Unet3Plus. Did you mean 'deep_supervision'\?"):
        config_from_dict(raw)
    raw["model"]["params"] = {"classes": 3}
    with pytest.raises(ConfigError, match=r"params.classes: set model.classes instead"):
        config_from_dict(raw)
    raw["model"]["params"] = {"drop_path_rate": 0.1}  # a timm encoder's keyword: accepted with tu-
    assert config_from_dict(raw, ["model.encoder_name=tu-resnet18"]).model.params["drop_path_rate"] == 0.1
    with pytest.raises(ConfigError, match="nor timm's resnet18 takes them"):
        config_from_dict({**raw, "model": {**raw["model"], "params": {"drop_pth_rate": 0.1}}},
                         ["model.encoder_name=tu-resnet18"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"\['drop_path_rate'\] not parameters of Unet3Plus"):
        config_from_dict(raw)  # an smp encoder would drop it
    raw["model"]["params"] = {"decoder_attention_type": "scse"}
    assert config_from_dict(raw, ["model.arch=unetplusplus"]).model.params["decoder_attention_type"] == "scse"
    with pytest.raises(TypeError, match="not parameters of Unet"):
        create_model("unet", "resnet18", encoder_weights=None, decoder_cat_channels=8)  # UNet 3+'s, not smp's


def test_unet3plus_takes_smp_style_arguments_and_refuses_the_rest():
    model = Unet3Plus("resnet18", encoder_weights=None, classes=3, decoder_cat_channels=8,
                      decoder_attention_type="scse").eval()  # fmt: skip
    names = {type(m).__name__ for m in model.decoder.modules()}
    assert "SCSEModule" in names
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = Unet3Plus(
            "resnet18", encoder_weights=None, decoder_cat_channels=8, decoder_use_batchnorm=False
        )
    assert any("decoder_use_batchnorm is deprecated" in str(w.message) for w in caught)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.decoder.modules())
    with pytest.raises(ValueError, match="no decoder_channels.*set decoder_cat_channels"):
        Unet3Plus("resnet18", encoder_weights=None, decoder_channels=(256, 128, 64, 32, 16))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['deep_supervison'\]"):
        Unet3Plus("resnet18", encoder_weights=None, deep_supervison=True)
    with pytest.raises(RuntimeError, match="does not support TorchScript.*torch.export"):
        torch.jit.script(plain)


# ------------------------------------------------------------------- 13. masks are read as they are
def _mask_folder(tmp_path, values):
    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    for i, value_set in enumerate(values):
        cv2.imwrite(str(tmp_path / "image" / f"{i}.png"), np.full((32, 32, 3), 100, np.uint8))
        mask = np.zeros((32, 32), np.uint8)
        for k, v in enumerate(value_set):
            mask[k * 2 : k * 2 + 2] = v
        cv2.imwrite(str(tmp_path / "mask" / f"{i}.png"), mask)
    (tmp_path / "folds.csv").write_text(
        "image_id,fold\n" + "".join(f"{i},{i % 2}\n" for i in range(len(values)))
    )
    return {"format": "folder", "image_dir": str(tmp_path / "image"), "mask_dir": str(tmp_path / "mask"),
            "folds": str(tmp_path / "folds.csv"), "classes": [f"c{k}" for k in range(11)]}  # fmt: skip


def test_multiclass_mask_folders_keep_their_class_ids(tmp_path):
    data = _mask_folder(tmp_path, [[0, 3, 10, 255], [0, 7]])
    cfg = config_from_dict({"name": "m", "data": data, "output_dir": str(tmp_path / "runs")})
    train_set, val_set, names = build_datasets(cfg, 0)
    assert len(names) == 11
    assert set(np.unique(np.asarray(train_set[0]["mask"])).tolist()) | set(
        np.unique(np.asarray(val_set[0]["mask"])).tolist()
    ) == {0, 3, 7, 10, 255}
    assert cfg.data.mask_values() is None  # 11 classes: the values are the class ids
    with pytest.raises(
        ConfigError, match=r"value_map 'binary' makes 2 classes .*, but data.classes lists 11"
    ):
        config_from_dict({"name": "m", "data": {**data, "value_map": "binary"}})
    with pytest.raises(ConfigError, match=r"value_map \{20: 11\} maps outside the 11 classes"):
        config_from_dict({"name": "m", "data": {**data, "value_map": {20: 11}}})
    binary = config_from_dict({"name": "m", "data": {**data, "classes": None}})
    assert binary.data.mask_values() == "binary"  # two classes: mask > 127 is the foreground


def test_mask_values_outside_the_classes_name_the_file(tmp_path):
    data = _mask_folder(tmp_path, [[0, 12], [0, 1]])
    dataset = MaskFolderDataset(data["image_dir"], data["mask_dir"], None, None, None, 11)
    with pytest.raises(ValueError, match=r"mask .*0.png holds values \[12\].*no class id 0..10"):
        dataset[0]
    assert set(np.unique(dataset[1]["mask"]).tolist()) == {0, 1}
    mapped = MaskFolderDataset(data["image_dir"], data["mask_dir"], None, {0: 0, 12: 4}, None, 11)
    assert set(np.unique(mapped[0]["mask"]).tolist()) == {0, 4}
    with pytest.raises(ValueError, match=r"holds values \[1\].*under data.value_map"):
        mapped[1]
