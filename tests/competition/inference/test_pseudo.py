"""Leaderboard toolkit, training side: pseudo-label sets (``competition pseudo`` + ``data.extra``) and
copy-paste augmentation."""

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from competition.cli import main
from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict
from competition.data.classes import ClassMap
from competition.data.coco import load_coco
from competition.data.copy_paste import CopyPaste
from competition.data.splits import build_datasets
from competition.data.transforms import EpochSeeded
from competition.inference import pseudo as pseudo_stage
from competition.inference.pseudo import coverage_row, make_pseudo, pseudo_mask
from competition.train.loop import train
from competition.train.preflight import preflight
from tests.conftest import tiny_config_dict


def test_pseudo_mask_keeps_confident_pixels_and_reports_coverage():
    probs = torch.tensor(
        [[[0.95, 0.5], [0.05, 0.1]], [[0.03, 0.4], [0.92, 0.1]], [[0.02, 0.1], [0.03, 0.8]]]
    )  # [3 classes, 2, 2]: top probabilities 0.95, 0.5, 0.92, 0.8
    mask = pseudo_mask(probs, 0.9)
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 255], [1, 255]]
    assert pseudo_mask(probs, 0.5).tolist() == [[0, 0], [1, 2]]  # 0.5 is not below 0.5
    row = coverage_row("a.jpg", mask, ["bg", "x", "y"])
    assert row == {"file_name": "a.jpg", "confident": 0.5, "bg": 0.25, "x": 0.25, "y": 0.0}


def _pseudo_cli(run, data, out, *extra):
    return main(
        ["pseudo", "--runs", str(run), "--data-root", str(data["root"]), "--test", str(data["test"]),
         "--out", str(out), "--workers", "0", "--device", "cpu", *extra]
    )  # fmt: skip


def test_pseudo_set_joins_every_training_split_and_no_validation_split(
    trained_run, synthetic_data, tmp_path, capsys
):
    cfg, _ = trained_run
    out = tmp_path / "pseudo1"
    assert _pseudo_cli(cfg.output_dir / cfg.name, synthetic_data, out, "--threshold", "0.5") == 0
    assert "Train on them with data.extra" in capsys.readouterr().out
    manifest = json.loads((out / "pseudo.json").read_text())
    test_names = [i["file_name"] for i in json.loads(synthetic_data["test"].read_text())["images"]]
    assert [i["file_name"] for i in manifest["images"]] == test_names
    assert manifest["class_names"] == list(
        ClassMap.build(load_coco(synthetic_data["train"]).categories).names
    )
    assert manifest["fold_matched"] and manifest["folds"] == [0, 1]  # one mask per image and fold
    coverage = pd.read_csv(out / "coverage.csv")
    assert len(coverage) == 2 * len(test_names)
    items = {i["file_name"]: i for i in manifest["images"]}
    for _, row in coverage.iterrows():
        mask = cv2.imread(str(out / items[row["file_name"]]["masks"][str(row["fold"])]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (64, 64)
        assert row["confident"] == pytest.approx((mask != 255).mean())
        assert row["General trash"] == pytest.approx((mask == 1).mean())

    raw = tiny_config_dict(synthetic_data, tmp_path / "runs")
    plain = config_from_dict(raw)
    with_pseudo = config_from_dict(raw, [f"data.extra=[{out}]"])
    for fold in (0, 1):
        train_plain, val_plain, _ = build_datasets(plain, fold)
        train_set, val_set, _ = build_datasets(with_pseudo, fold)
        assert len(train_set) == len(train_plain) + len(test_names)
        names = [train_set[i]["file_name"] for i in range(len(train_set))]
        assert names[len(train_plain) :] == test_names
        assert val_set.image_ids == val_plain.image_ids  # validation untouched
        assert not set(test_names) & {val_set[i]["file_name"] for i in range(len(val_set))}
        pseudo_sample = train_set[len(train_plain)]
        assert isinstance(pseudo_sample["image_id"], str) and pseudo_sample["mask"].shape == (64, 64)


def test_a_pseudo_round_leaves_the_oof_files_of_the_labelled_images_unchanged(
    trained_run, synthetic_data, tmp_path
):
    cfg, _ = trained_run
    out = make_pseudo([cfg.output_dir / cfg.name], synthetic_data["root"], synthetic_data["test"],
                      tmp_path / "pseudo", threshold=0.5, workers=0, progress=False)["dir"]  # fmt: skip
    raw = tiny_config_dict(synthetic_data, tmp_path / "runs", epochs=1)
    runs = {}
    for name, overrides in {"plain": [], "pseudo": [f"data.extra=[{out}]"]}.items():
        run_cfg = config_from_dict({**raw, "name": name}, overrides)
        train(run_cfg, "0")
        runs[name] = np.load(run_cfg.run_dir(0) / "oof.npz")
    plain, pseudo = runs["plain"], runs["pseudo"]
    assert sorted(plain.files) == sorted(pseudo.files)  # the same labelled images, no pseudo image
    assert not any("pseudo" in key or "test_" in key for key in pseudo.files)
    for key in plain.files:
        if key.startswith("target__") or key in ("image_ids", "class_names", "fold", "ignore_index"):
            assert np.array_equal(plain[key], pseudo[key]), key
        elif key.startswith("pred__"):
            assert plain[key].shape == pseudo[key].shape


def test_pseudo_bad_input_gives_clear_errors_and_writes_nothing(trained_run, synthetic_data, tmp_path):
    cfg, _ = trained_run
    run, root, test = cfg.output_dir / cfg.name, synthetic_data["root"], synthetic_data["test"]
    for threshold in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"--threshold must be in \(0, 1\)"):
            make_pseudo([run], root, test, tmp_path / "p", threshold=threshold)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**json.loads(test.read_text()), "images": []}))
    with pytest.raises(ValueError, match="has no images"):
        make_pseudo([run], root, empty, tmp_path / "p", workers=0)
    assert not (tmp_path / "p").exists()

    def broken(path, array):  # the disk fills up after two masks
        if len(list(path.parent.iterdir())) >= 2:
            raise OSError("No space left on device")
        cv2.imwrite(str(path), array)

    original = pseudo_stage.write_png
    pseudo_stage.write_png = broken
    try:
        with pytest.raises(OSError, match="No space"):
            make_pseudo([run], root, test, tmp_path / "p", workers=0, progress=False)
    finally:
        pseudo_stage.write_png = original
    assert list(tmp_path.iterdir()) == [empty]  # no output folder, no temp folder
    assert _pseudo_cli(run, synthetic_data, tmp_path / "q", "--threshold", "2") == 1


def test_pseudo_sets_with_other_classes_or_labelled_images_are_refused(trained_run, synthetic_data, tmp_path):
    cfg, _ = trained_run
    run, root = cfg.output_dir / cfg.name, synthetic_data["root"]
    raw = tiny_config_dict(synthetic_data, tmp_path / "runs")
    # "test" sets that hold a training image under another name: a byte copy, a PNG copy of the JPEG and a
    # JPEG re-encoded at quality 80 all show the same picture
    train_json = json.loads(synthetic_data["train"].read_text())
    first = train_json["images"][0]
    picture = cv2.imread(str(root / first["file_name"]))
    copies = tmp_path / "copies"
    copies.mkdir()
    shutil.copy(root / first["file_name"], copies / "copy_of_first.jpg")
    cv2.imwrite(str(copies / "copy_of_first.png"), picture)
    cv2.imwrite(str(copies / "copy_of_first_q80.jpg"), picture, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert (copies / "copy_of_first.png").read_bytes() != (root / first["file_name"]).read_bytes()
    for name in ("copy_of_first.jpg", "copy_of_first.png", "copy_of_first_q80.jpg"):
        leak = tmp_path / f"{name}.json"
        copied = {**first, "id": 0, "file_name": name}
        leak.write_text(json.dumps({**train_json, "annotations": [], "images": [copied]}))
        make_pseudo([run], copies, leak, tmp_path / f"leak_{name}", workers=0, progress=False)
        with pytest.raises(
            ConfigError, match=rf"same picture as labelled images.*{name} = .*{first['file_name']}"
        ):
            build_datasets(config_from_dict(raw, [f"data.extra=[{tmp_path / f'leak_{name}'}]"]), 0)
    # the real test images are other pictures: accepted (no false alarm)
    honest = make_pseudo([run], root, synthetic_data["test"], tmp_path / "honest", workers=0, progress=False)
    build_datasets(config_from_dict(raw, [f"data.extra=[{honest['dir']}]"]), 0)

    good = make_pseudo([run], root, synthetic_data["test"], tmp_path / "good", workers=0, progress=False)
    manifest = json.loads((good["dir"] / "pseudo.json").read_text())
    manifest["class_names"] = manifest["class_names"][::-1]
    (good["dir"] / "pseudo.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"was labelled with classes \['Clothing'"):
        build_datasets(config_from_dict(raw, [f"data.extra=[{good['dir']}]"]), 0)
    with pytest.raises(ConfigError, match="not a pseudo-label set"):
        build_datasets(config_from_dict(raw, [f"data.extra=[{tmp_path}]"]), 0)


def _square_coco(tmp_path):
    """Image 1: black with a red 8x8 square (category 7 -> class 2); image 2: grey, no objects."""
    source = np.zeros((32, 32, 3), np.uint8)
    source[8:16, 8:16] = (200, 30, 30)
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(source, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "b.png"), np.full((32, 32, 3), 100, np.uint8))
    square = [8, 8, 16, 8, 16, 16, 8, 16]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32},
                   {"id": 2, "file_name": "b.png", "height": 32, "width": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": [square], "area": 64.0,
                         "bbox": [8, 8, 8, 8], "iscrowd": 0}],
        "categories": [{"id": 7, "name": "red"}],
    }  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(coco))
    return load_coco(tmp_path / "c.json", tmp_path)


def test_copy_paste_keeps_image_and_mask_aligned(tmp_path):
    coco = _square_coco(tmp_path)
    target, target_mask = np.full((32, 32, 3), 100, np.uint8), np.zeros((32, 32), np.uint8)
    exact = CopyPaste(coco, {7: 2}, tmp_path, [1, 2], p=1.0, max_objects=1, scale=(1.0, 1.0))
    for seed in range(5):
        image, mask = exact(target, target_mask, np.random.default_rng(seed), image_id=2)
        assert (mask == 2).sum() == 64  # the whole square, nothing else
        assert (image[mask == 2] == (200, 30, 30)).all() and (image[mask == 0] == 100).all()
    assert (target == 100).all() and (target_mask == 0).all()  # inputs are not modified
    jitter = CopyPaste(coco, {7: 2}, tmp_path, [1, 2], p=1.0, max_objects=3, scale=(0.5, 2.0))
    areas = set()
    for seed in range(10):
        image, mask = jitter(target, target_mask, np.random.default_rng(seed), image_id=2)
        changed = (image != 100).any(axis=2)
        assert np.array_equal(changed, mask == 2)  # pasted pixels carry the class and the object's pixels
        areas.add(int((mask == 2).sum()))
    assert len(areas) > 3
    # never pasted onto its own image, and p=0 pastes nothing
    image, mask = exact(target, target_mask, np.random.default_rng(0), image_id=1)
    assert (mask == 0).all()
    never = CopyPaste(coco, {7: 2}, tmp_path, [1, 2], p=0.0)
    assert never(target, target_mask, np.random.default_rng(0))[0] is target
    # sources come only from the given image ids (a fold's training split)
    assert len(CopyPaste(coco, {7: 2}, tmp_path, [2], p=1.0)) == 0
    # sources come only from the listed classes when given
    assert len(CopyPaste(coco, {7: 2}, tmp_path, [1, 2], p=1.0, classes={2})) == 1
    assert len(CopyPaste(coco, {7: 2}, tmp_path, [1, 2], p=1.0, classes={1, 3})) == 0


def test_copy_paste_draws_classes_evenly_when_balanced(tmp_path):
    coco = _square_coco(tmp_path)
    paste = CopyPaste(coco, {7: 2}, tmp_path, [1, 2], p=1.0, max_objects=1)
    paste.instances = [(1, 0, 1)] * 20 + [(1, 0, 2)]  # 20 instances of class 1, one of class 2
    paste.by_class = {1: list(range(20)), 2: [20]}
    rng = np.random.default_rng(0)
    picks = [paste.instances[paste.choose(rng)[0]][2] for _ in range(2000)]
    assert 0.45 < np.mean(np.array(picks) == 2) < 0.55
    paste.balanced = False
    picks = [paste.instances[paste.choose(rng)[0]][2] for _ in range(2000)]
    assert np.mean(np.array(picks) == 2) < 0.1


def test_copy_paste_in_training_is_reproducible_per_seed_epoch_and_index(synthetic_data, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path / "runs")
    cfg = config_from_dict(raw, ["augment.copy_paste=1.0", "augment.hflip=0"])
    train_set, _, _ = build_datasets(cfg, 0)
    plain_set, _, _ = build_datasets(config_from_dict(raw, ["augment.hflip=0"]), 0)
    sources = {image_id for image_id, _, _ in train_set.paste.instances}
    assert sources and sources <= set(train_set.image_ids)  # the fold's training split only

    def masks(dataset, seed, epoch):
        seeded = EpochSeeded(dataset, seed)
        seeded.set_epoch(epoch)
        return [seeded[i]["mask"] for i in range(4)]

    first, again = masks(train_set, 0, 0), masks(train_set, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, masks(train_set, 0, 1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, masks(plain_set, 0, 0)))  # it did paste
    only, _, _ = build_datasets(
        config_from_dict(raw, ["augment.copy_paste=1", "augment.copy_paste_classes=[Metal]"]), 0
    )
    assert {cls for _, _, cls in only.paste.instances} == {4}  # Metal is class 4
    assert len(only.paste) < len(train_set.paste)
    for wrong, message in (("[Metl]", "'Metl' is not an object class of this run. Did you mean 'Metal'"),
                           ("[Background]", "'Background' is not an object class")):  # fmt: skip
        cfg = config_from_dict(raw, ["augment.copy_paste=1.0", f"augment.copy_paste_classes={wrong}"])
        with pytest.raises(ConfigError, match=f"augment.copy_paste_classes: {message}"):
            build_datasets(cfg, 0)
        with pytest.raises(ConfigError, match=f"augment.copy_paste_classes: {message}"):
            preflight(cfg)  # before any run folder exists
    with pytest.raises(ConfigError, match="augment.copy_paste pastes object instances from COCO"):
        config_from_dict(
            {**raw, "data": {"format": "folder", "image_dir": str(tmp_path), "mask_dir": str(tmp_path),
                             "folds": str(synthetic_data["folds"])}},
            ["augment.copy_paste=0.5"],
        )  # fmt: skip


def test_class_thresholds_keep_each_classes_most_confident_share():
    from competition.inference.pseudo import class_thresholds

    hist = np.zeros((3, 256), np.int64)
    hist[0, 250], hist[0, 100] = 10, 10
    hist[1, 30] = 4
    assert class_thresholds(hist, 0.5).tolist() == [250, 30, 256]  # class 2 never predicted: keeps nothing
    assert class_thresholds(hist, 0.6).tolist() == [100, 30, 256]  # 12 of 20 pixels reach down to 100
    assert class_thresholds(hist, 1.0).tolist() == [100, 30, 256]


def test_class_balanced_pseudo_labels_keep_every_predicted_class(
    trained_run, synthetic_data, tmp_path, capsys
):
    cfg, _ = trained_run
    run = cfg.output_dir / cfg.name
    names = list(ClassMap.build(load_coco(synthetic_data["train"]).categories).names)
    sets = {}
    for label, extra in {
        "all": ["--threshold", "0.001"],
        "strict": ["--threshold", "0.999"],
        "balanced": ["--threshold", "0.999", "--class-share", "0.5"],
    }.items():
        assert _pseudo_cli(run, synthetic_data, tmp_path / label, *extra) == 0
        sets[label] = pd.read_csv(tmp_path / label / "coverage.csv").groupby("fold")[names].sum()
    predicted = sets["all"]
    assert (sets["balanced"] >= 0.5 * predicted - 1e-9).all().all()  # at least half of each class kept
    assert (sets["balanced"] >= sets["strict"] - 1e-9).all().all()
    assert (sets["balanced"].to_numpy()[predicted.to_numpy() > 0] > 0).all()
    manifest = json.loads((tmp_path / "balanced" / "pseudo.json").read_text())
    assert manifest["class_share"] == 0.5 and set(manifest["class_thresholds"]) == {"0", "1"}
    assert not list((tmp_path / "balanced").rglob("*.npy"))  # the first pass's predictions are gone
    assert _pseudo_cli(run, synthetic_data, tmp_path / "bad", "--class-share", "1.5") == 1
    assert "--class-share must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
