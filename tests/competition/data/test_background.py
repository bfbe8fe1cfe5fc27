"""A background class that is configurable (issue 22): ``data.background: <name> | none``.

Without a background class (CamVid whose void is no class) unannotated pixels are ignored, every class is a
real one: folds stratify on it, copy-paste pastes it, CGM gates it, panels colour it, and runs with and
without a background class are never joined."""

import numpy as np
import pytest
import torch

from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict
from competition.data.classes import BOOSTCAMP_CLASSES, IGNORE_INDEX, ClassMap
from competition.data.coco import MaskCache, load_coco, rasterize
from competition.data.folds import presence_matrix
from competition.data.panels import overlay, palette
from competition.predictions.provenance import ProvenanceError, config_hash
from smp_unet3p import Unet3Plus
from smp_unet3p.modules.cgm import ABSENT_LOGIT_OFFSET, gate_logits
from tests.conftest import fake_oof_run, onehot, tiny_config_dict

OBJECTS = list(BOOSTCAMP_CLASSES[1:])


def _cfg(synthetic_data, tmp_path, **data):
    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["data"].update(data)
    return config_from_dict(raw)


def test_background_is_the_first_class_or_none_and_says_so(synthetic_data, tmp_path):
    auto = _cfg(synthetic_data, tmp_path)
    assert auto.data.background_index() == 0
    assert "cgm_background" not in auto.model.params
    named = _cfg(synthetic_data, tmp_path, classes=list(BOOSTCAMP_CLASSES), background="background")
    assert named.data.background_index() == 0
    with pytest.raises(ConfigError, match="must be the first of data.classes"):
        _cfg(synthetic_data, tmp_path, classes=list(BOOSTCAMP_CLASSES), background="Paper")
    with pytest.raises(ConfigError, match="needs data.classes"):
        _cfg(synthetic_data, tmp_path, background="none")
    for word in ("none", "None", None):
        cfg = _cfg(synthetic_data, tmp_path, classes=OBJECTS, background=word)
        assert cfg.data.background == "none" and cfg.data.background_index() is None
        assert cfg.model.params["cgm_background"] is None  # CGM gates every class, and config.yaml says so
        assert config_hash(cfg) != config_hash(_cfg(synthetic_data, tmp_path, classes=OBJECTS))
    raw = tiny_config_dict(synthetic_data, tmp_path)
    raw["data"].update(classes=OBJECTS, background="none")
    raw["model"]["params"]["cgm_background"] = 0
    with pytest.raises(ConfigError, match="cgm_background=0 with data.background: none"):
        config_from_dict(raw)


def test_without_background_unannotated_pixels_are_ignored_and_class_0_is_real(synthetic_data, tmp_path):
    ann = {"id": 1, "category_id": 5, "iscrowd": 0, "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]}
    mask = rasterize([ann], 5, 5, {5: 0}, fill=IGNORE_INDEX)
    assert mask[2, 2] == 0 and mask[0, 0] == IGNORE_INDEX and (mask == 0).sum() == 4

    coco = load_coco(synthetic_data["train"], synthetic_data["root"])
    with_bg = ClassMap.build(coco.categories)
    without = ClassMap.build(coco.categories, OBJECTS, background=False)
    assert (
        without.objects == tuple(OBJECTS) and without.first_object == 0 and with_bg.objects == tuple(OBJECTS)
    )
    cache = MaskCache(coco, without, tmp_path / "cache")
    plain = MaskCache(coco, with_bg, tmp_path / "cache")
    assert cache.dir != plain.dir  # a different mask for the same annotations
    cache.build(progress=False)
    plain.build(progress=False)
    image_id = next(iter(coco.images))
    a, b = cache.load(image_id), plain.load(image_id)
    assert ((a == IGNORE_INDEX) == (b == 0)).all()  # the unannotated pixels
    annotated = b > 0
    np.testing.assert_array_equal(a[annotated], b[annotated] - 1)  # classes shift down by one
    # folds stratify on the same object classes either way
    assert (presence_matrix(coco, without)[OBJECTS] == presence_matrix(coco, with_bg)[OBJECTS]).all().all()


def test_cgm_gates_every_class_without_a_background():
    masks = torch.zeros(1, 3, 2, 2)
    absent = torch.full((1, 3), -20.0)  # every class judged absent
    kept = gate_logits(masks, absent, "hard")
    assert kept[0, 0].abs().max() == 0 and (kept[0, 1:] == ABSENT_LOGIT_OFFSET).all()
    gated = gate_logits(masks, absent, "hard", background=None)
    assert (gated == ABSENT_LOGIT_OFFSET).all()
    middle = gate_logits(masks, absent, "hard", background=1)
    assert middle[0, 1].abs().max() == 0 and (middle[0, [0, 2]] == ABSENT_LOGIT_OFFSET).all()
    model = Unet3Plus(
        "resnet18", encoder_weights=None, classes=3, cgm=True, cgm_gate="hard", cgm_background=None
    )
    model.eval()
    with torch.no_grad():
        model.cgm[1].bias.fill_(-50.0)  # presence logits far below zero whatever the features
        model.cgm[1].weight.zero_()
        out = model(torch.randn(1, 3, 64, 64))
    assert (out < ABSENT_LOGIT_OFFSET / 2).all()
    with pytest.raises(ValueError, match="cgm_background must be None or a class id in"):
        Unet3Plus("resnet18", encoder_weights=None, classes=3, cgm=True, cgm_background=3)


def test_panels_colour_class_0_only_without_a_background():
    assert (palette(4)[0] == 0).all() and palette(4)[1].any()
    assert palette(4, background=None)[0].any() and (palette(4, None)[255] == 255).all()
    image = np.full((2, 2, 3), 200, np.uint8)
    mask = np.array([[0, 1], [0, 255]], np.uint8)
    plain = overlay(image, mask, 4)
    assert (plain[0, 0] == 200).all() and not (plain[0, 1] == 200).all()  # background left as it is
    coloured = overlay(image, mask, 4, background=None)
    assert not (coloured[0, 0] == 200).all()


def test_runs_with_and_without_background_are_not_joined_and_tuning_needs_one(tmp_path):
    from competition.core.config_file import config_from_dict
    from competition.oof.tune import Tuner
    from competition.predictions.oof import OofRuns

    labels = np.array([[0, 1], [1, 1]])
    items = {0: {"a": (onehot(labels, 2), labels)}, 1: {"b": (onehot(labels, 2), labels)}}
    first = fake_oof_run(tmp_path, "first", items, ["Sky", "Road"])
    second = fake_oof_run(tmp_path, "second", items, ["Sky", "Road"])
    data = {
        "root": str(tmp_path),
        "annotations": str(tmp_path / "train.json"),
        "folds": str(tmp_path / "folds.csv"),
    }
    data |= {"classes": ["Sky", "Road"], "background": "none"}
    no_background = config_from_dict({"name": "second", "data": data, "train": {"epochs": 1}})
    for fold in (0, 1):
        (second / f"fold{fold}" / "config.yaml").write_text(no_background.to_yaml())
    assert OofRuns([first]).background == 0 and OofRuns([second]).background is None
    with pytest.raises(ProvenanceError, match="runs differ in data.background"):
        OofRuns([first, second])
    with pytest.raises(ValueError, match="no background class"):
        Tuner(OofRuns([second]))


def test_rle_submissions_without_a_background_keep_class_0(tmp_path):
    from competition.predictions.submission import (
        class_pixel_counts,
        rle_decode,
        submission_rows,
        write_submission,
    )

    mask = np.array([[0, 0, 2], [1, 0, 2]], np.uint8)
    plain = submission_rows("a.jpg", mask, "rle", size=None)
    assert [r[1] for r in plain] == [1, 2]  # class 0 is the background: no row
    rows = submission_rows("a.jpg", mask, "rle", size=None, background=None)
    assert [r[1] for r in rows] == [0, 1, 2]  # a real class: its row, or its pixels would be lost
    assert np.array_equal(rle_decode(rows[0][2], (2, 3)), (mask == 0).astype(np.uint8))
    shapes = {"a.jpg": (2, 3)}
    with pytest.raises(ValueError, match="class_id 0 is the background"):
        write_submission(rows, tmp_path / "bad.csv", ["a.jpg"], 3, "rle", None, shapes=shapes)
    assert not (tmp_path / "bad.csv").exists()
    path = write_submission(
        rows, tmp_path / "s.csv", ["a.jpg"], 3, "rle", None, shapes=shapes, background=None
    )
    square = submission_rows("a.jpg", np.array([[0, 2], [1, 0]], np.uint8), "rle", size=2, background=None)
    write_submission(square, tmp_path / "q.csv", ["a.jpg"], 3, "rle", 2, background=None)
    assert class_pixel_counts(tmp_path / "q.csv", 3, "rle", 2, background=None).tolist() == [2, 1, 1]
    assert path.is_file()


def test_probability_files_of_runs_with_and_without_background_are_not_voted_together(tmp_path):
    from competition.inference.ensemble import ProbFiles

    def block(background):
        run = {"name": "r", "config_hash": "x"} | ({"background": None} if background is None else {})
        return {"kind": "probs", "runs": [run]}

    def files(*backgrounds):
        return ProbFiles(
            [tmp_path / f"{i}.npz" for i in range(len(backgrounds))], [], ["a"], list(backgrounds)
        )

    assert files(block(None), block(None)).background() is None
    assert files(block(0), None).background() == 0  # a file written before provenance: the old default
    with pytest.raises(ProvenanceError, match="differ in data.background"):
        files(block(0), block(None)).background()


def test_mask_post_processing_is_refused_for_runs_without_a_background(tmp_path):
    from competition.predictions.postprocess import PostProcess

    path = PostProcess(["Sky", "Road"], min_area={"Road": 0.01}).save(tmp_path / "postprocess.json")
    assert PostProcess.load(path, ["Sky", "Road"]).changes_masks  # runs with a background class: read
    with pytest.raises(ValueError, match="mask operations need a background class"):
        PostProcess.load(path, ["Sky", "Road"], background=None)  # predict, ensemble and export all read here
    plain = PostProcess(["Sky", "Road"]).save(tmp_path / "none.json")
    assert not PostProcess.load(plain, ["Sky", "Road"], background=None).changes_masks  # nothing to refuse
