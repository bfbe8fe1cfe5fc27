import json

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold

from competition.cli import main as cli
from competition.data.classes import ClassMap, CocoFormatError, read_merge_map
from competition.data.coco import MaskCache, load_coco, rasterize, safe_join
from competition.data.datasets import CocoSegmentationDataset, MaskFolderDataset, read_image
from competition.data.folds import make_folds, stratification_error

SQUARE = [[1, 1, 5, 1, 5, 5, 1, 5]]  # pycocotools fills pixel centres inside: rows/cols 1..4


def write_coco(tmp_path, images=None, annotations=None, categories=None, name="train.json"):
    data = {
        "images": images
        if images is not None
        else [{"id": 1, "file_name": "a/img1.png", "height": 8, "width": 8}],
        "annotations": annotations if annotations is not None else [],
        "categories": categories
        if categories is not None
        else [{"id": 0, "name": "Paper"}, {"id": 7, "name": "Glass"}],
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def ann(i, cat, seg, image_id=1, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "segmentation": seg, "iscrowd": crowd}


def test_polygon_rasterisation_by_hand():
    mask = rasterize([ann(1, 0, SQUARE)], 8, 8, {0: 2})
    expected = np.zeros((8, 8), np.uint8)
    expected[1:5, 1:5] = 2
    np.testing.assert_array_equal(mask, expected)


def test_multipart_polygon_and_rles():
    two_parts = [[0, 0, 2, 0, 2, 2, 0, 2], [5, 5, 7, 5, 7, 7, 5, 7]]
    mask = rasterize([ann(1, 0, two_parts)], 8, 8, {0: 1})
    assert mask[0:2, 0:2].all() and mask[5:7, 5:7].all() and mask.sum() == 8
    # uncompressed RLE, column-major: 2 zeros, 3 ones, rest zeros in a 4x4 image
    rle = {"size": [4, 4], "counts": [2, 3, 11]}
    m = rasterize([ann(1, 7, rle)], 4, 4, {7: 3})
    assert m.T.ravel().tolist() == [0, 0, 3, 3, 3] + [0] * 11
    from pycocotools import mask as mu

    compressed = mu.encode(np.asfortranarray((m > 0).astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    np.testing.assert_array_equal(rasterize([ann(2, 7, compressed)], 4, 4, {7: 3}), m)


def test_overlap_order_smaller_on_top_and_crowd_modes():
    big = [[0, 0, 8, 0, 8, 8, 0, 8]]
    anns = [ann(1, 0, SQUARE), ann(2, 7, big)]  # small listed first: still drawn on top
    mask = rasterize(anns, 8, 8, {0: 1, 7: 2})
    assert mask[2, 2] == 1 and mask[6, 6] == 2
    crowd = [ann(1, 0, SQUARE, crowd=1)]
    assert rasterize(crowd, 8, 8, {0: 1}, crowd="class")[2, 2] == 1
    assert rasterize(crowd, 8, 8, {0: 1}, crowd="ignore")[2, 2] == 255


def test_class_map_by_name_with_category_id_zero_and_merge_map(tmp_path):
    cm = ClassMap.build({0: "Paper", 7: "glass"}, ["Background", "Glass", "Paper"])
    assert dict(cm.category_to_class) == {0: 2, 7: 1}
    merge = tmp_path / "map.csv"
    merge.write_text("Aerosol,Can\nDrink can,Can\nBattery,Other\n")
    cm = ClassMap.build({0: "Aerosol", 1: "Drink can", 2: "Battery"}, merge_map=read_merge_map(merge))
    assert cm.names == ("Background", "Can", "Other")
    assert dict(cm.category_to_class) == {0: 1, 1: 1, 2: 2}
    with pytest.raises(CocoFormatError, match="'Cardboard' \\(id 3\\)"):
        ClassMap.build({3: "Cardboard"}, ["Background", "Paper"])


def test_taco_categories_fold_into_ten_classes(shared_data):
    with pytest.warns(UserWarning, match="duplicate annotation id"):
        coco = load_coco(shared_data / "taco" / "annotations.json")
    cm = ClassMap.build(coco.categories, merge_map=read_merge_map(shared_data / "taco" / "map_10.csv"))
    assert cm.num_classes == 11 and 0 in cm.category_to_class
    assert len(coco.images) == 1500 and sum(map(len, coco.annotations.values())) == 4784


def test_cache_reuse_and_invalidation(tmp_path):
    path = write_coco(tmp_path, annotations=[ann(1, 0, SQUARE)])
    coco = load_coco(path)
    cm = ClassMap.build(coco.categories, ["Background", "Paper", "Glass"])
    cache = MaskCache(coco, cm, tmp_path / "cache")
    index = cache.build(workers=1, progress=False)
    assert index.loc[0, "px_1"] == 16 and index.loc[0, "px_0"] == 48
    mtime = cache.mask_path(1).stat().st_mtime_ns
    assert MaskCache(load_coco(path), cm, tmp_path / "cache").build(progress=False).equals(index)
    assert cache.mask_path(1).stat().st_mtime_ns == mtime  # reused, not rebuilt
    other_map = ClassMap.build(coco.categories, ["Background", "Glass", "Paper"])
    assert MaskCache(coco, other_map, tmp_path / "cache").dir != cache.dir
    write_coco(tmp_path, annotations=[ann(1, 7, SQUARE)])
    changed = MaskCache(load_coco(path), cm, tmp_path / "cache")
    assert changed.dir != cache.dir
    assert changed.build(progress=False).loc[0, "px_2"] == 16


def test_interrupted_cache_build_finishes_and_ignores_temp_files(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in (1, 2)]
    path = write_coco(tmp_path, images=images, annotations=[ann(1, 0, SQUARE), ann(2, 7, SQUARE, image_id=2)])
    coco = load_coco(path)
    cm = ClassMap.build(coco.categories, ["Background", "Paper", "Glass"])
    cache = MaskCache(coco, cm, tmp_path / "cache")
    (cache.dir / "masks").mkdir(parents=True)
    cv2.imwrite(str(cache.mask_path(1)), rasterize(coco.annotations[1], 8, 8, cm.category_to_class))
    (cache.dir / "masks" / ".2.half.tmp.png").write_bytes(b"\x89PNG half")  # a kill mid-write
    index = cache.build(workers=1, progress=False)
    assert list(index["px_1"]) == [16, 0] and list(index["px_2"]) == [0, 16]
    assert not list((cache.dir / "masks").glob(".*"))


@pytest.mark.parametrize(
    "images,annotations,message",
    [
        ([{"id": 1, "file_name": "../x.png", "height": 8, "width": 8}], [], "escapes the data root"),
        ([{"id": 1, "file_name": "/etc/passwd", "height": 8, "width": 8}], [], "escapes the data root"),
        ([{"id": 1, "file_name": "a.png", "height": 8, "width": 8}] * 2, [], "duplicate image id 1"),
        ([{"id": 1, "file_name": "a.png", "width": 8}], [], "image #0 needs"),
    ],
)
def test_fatal_inputs_name_the_item(tmp_path, images, annotations, message):
    with pytest.raises(CocoFormatError, match=message):
        load_coco(write_coco(tmp_path, images=images, annotations=annotations))


def test_malformed_json_and_missing_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match="bad.json: not valid JSON"):
        load_coco(bad)
    bad.write_text('{"annotations": []}')
    with pytest.raises(CocoFormatError, match=r"missing top-level keys \['images'\]"):
        load_coco(bad)
    bad.write_text('{"images": [], "annotations": [{"id": 1}]}')  # annotations need their categories
    with pytest.raises(CocoFormatError, match=r"missing top-level keys \['categories'\]"):
        load_coco(bad)
    bad.write_text('{"images": [], "annotations": []}')  # a test set: images only
    assert load_coco(bad).categories == {}


def test_bad_annotations_are_skipped_with_counts(tmp_path):
    anns = [
        ann(1, 0, SQUARE),
        ann(2, 0, SQUARE, image_id=99),
        ann(3, 42, SQUARE),
        ann(4, 0, [[0, 0, 1, 1]]),
        ann(5, 0, [[0, 0, float("nan"), 1, 2, 2]]),
        ann(6, 0, {"size": [4, 4], "counts": [16]}),
    ]
    with pytest.warns(UserWarning) as record:
        coco = load_coco(write_coco(tmp_path, annotations=anns))
    text = str(record[0].message)
    assert "unknown image_id 99" in text and "unknown category_id 42" in text and "annotation 6" in text
    assert coco.issues == {"unknown image": 1, "unknown category": 1, "bad segmentation": 3}
    assert [a["id"] for a in coco.annotations[1]] == [1]


def test_safe_join_follows_linked_folders_but_refuses_climbing_names(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount" / "a.png").write_bytes(b"x")
    (tmp_path / "root" / "images").symlink_to(tmp_path / "mount")  # a read-only dataset mount
    assert safe_join(tmp_path / "root", "images/a.png").read_bytes() == b"x"
    for name in ("../mount/a.png", "images/../../mount/a.png", "/etc/passwd", "C:\\x.png"):
        with pytest.raises(CocoFormatError, match="escapes the data root"):
            safe_join(tmp_path / "root", name)


def test_read_image_variants_and_errors(tmp_path):
    gray = np.full((4, 5), 7, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    assert read_image(tmp_path / "g.png").shape == (4, 5, 3)
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 2] = 200  # red in BGR(A) order
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [200, 0, 0]
    cv2.imwrite(str(tmp_path / "w.png"), np.full((4, 5), 65535, np.uint16))
    assert read_image(tmp_path / "w.png").max() == 255
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(OSError, match="empty"):
        read_image(tmp_path / "empty.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="cannot decode"):
        read_image(tmp_path / "junk.jpg")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "none.jpg")


def test_coco_dataset_checks_sizes_and_returns_tensors(tmp_path):
    path = write_coco(tmp_path, annotations=[ann(1, 0, SQUARE)])
    (tmp_path / "a").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "img1.png"), np.zeros((8, 8, 3), np.uint8))
    coco = load_coco(path)
    cache = MaskCache(coco, ClassMap.build(coco.categories, ["Background", "Paper", "Glass"]), tmp_path / "c")
    with pytest.raises(RuntimeError, match="not built"):
        CocoSegmentationDataset(cache, tmp_path)
    cache.build(progress=False)
    sample = CocoSegmentationDataset(cache, tmp_path)[0]
    assert (
        sample["image"].shape == (3, 8, 8) and sample["mask"].shape == (8, 8) and sample["mask"].sum() == 16
    )
    cv2.imwrite(str(tmp_path / "a" / "img1.png"), np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="is 8x6 but train.json says 8x8"):
        CocoSegmentationDataset(cache, tmp_path)[0]


def test_isbi_mask_folder_dataset(shared_data):
    import albumentations as A

    root = shared_data / "isbi2012_membrane"
    ds = MaskFolderDataset(
        root / "image", root / "label", A.Compose([A.RandomCrop(128, 128)]), value_map="binary"
    )
    sample = ds[0]
    assert len(ds) == 30 and ds.stems[:3] == ["0", "1", "2"]
    assert sample["image"].shape == (3, 128, 128) and set(sample["mask"].unique().tolist()) <= {0, 1}


def imbalanced_presence(n=300, seed=0):
    rng = np.random.default_rng(seed)
    rates = np.array([0.6, 0.3, 0.1, 0.05, 0.03])
    return (rng.random((n, len(rates))) < rates).astype(int)


def test_stratified_folds_beat_plain_kfold():
    presence = imbalanced_presence()
    ours = stratification_error(presence, make_folds(presence, 5, seed=1))
    plain_folds = np.empty(len(presence), int)
    for fold, (_, held) in enumerate(KFold(5, shuffle=True, random_state=1).split(presence)):
        plain_folds[held] = fold
    plain = stratification_error(presence, plain_folds)
    assert ours.mean() < plain.mean() and ours.max() < plain.max()


def test_folds_are_deterministic_and_keep_groups_together():
    presence = imbalanced_presence(120)
    groups = [f"batch_{i % 12:02d}" for i in range(120)]
    a = make_folds(presence, 4, seed=3, groups=groups)
    assert np.array_equal(a, make_folds(presence, 4, seed=3, groups=groups))
    for g in set(groups):
        assert len({a[i] for i in range(120) if groups[i] == g}) == 1
    assert set(a) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="cannot split 3 groups into 5 folds"):
        make_folds(presence, 5, groups=[f"g{i % 3}" for i in range(120)])


def test_cli_prepare_and_folds(tmp_path, capsys):
    images = [{"id": i, "file_name": f"batch_{i % 3}/{i}.png", "height": 8, "width": 8} for i in range(9)]
    anns = [ann(i, i % 2 * 7, SQUARE, image_id=i) for i in range(9)]
    path = write_coco(tmp_path, images=images, annotations=anns)
    for image in images:  # prepare checks that the images exist before it writes anything
        (tmp_path / image["file_name"]).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / image["file_name"]), np.zeros((8, 8, 3), np.uint8))
    common = ["--data-root", str(tmp_path), "--annotations", str(path), "--classes", "Background,Paper,Glass"]
    assert (
        cli(
            [
                "prepare",
                *common,
                "--workers",
                "1",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    stats = (tmp_path / "s" / "class_stats.csv").read_text()
    assert "Paper,5,80" in stats and (tmp_path / "s" / "class_stats.png").is_file()
    assert len(list((tmp_path / "s").glob("overlay_*.png"))) == 4
    out = tmp_path / "folds.csv"
    assert cli(["folds", *common, "--out", str(out), "--k", "3", "--group-by-folder"]) == 0
    import pandas as pd

    table = pd.read_csv(out)
    assert table.groupby("group")["fold"].nunique().max() == 1 and len(table) == 9
    assert cli(["folds", *common, "--out", str(out), "--k", "3"]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_duplicate_category_id_is_fatal_and_duplicate_annotation_id_warns(tmp_path):
    cats = [{"id": 0, "name": "Paper"}, {"id": 0, "name": "Metal"}]
    with pytest.raises(CocoFormatError, match="duplicate category id 0"):
        load_coco(write_coco(tmp_path, categories=cats))
    with pytest.warns(UserWarning, match="duplicate annotation id"):
        coco = load_coco(write_coco(tmp_path, annotations=[ann(7, 0, SQUARE), ann(7, 0, SQUARE)]))
    assert len(coco.annotations[1]) == 2  # both kept (TACO has such pairs on different, valid annotations)


def test_median_frequency_weights_by_hand():
    from competition.data.stats import class_statistics, median_frequency_weights

    # pixels per class (rows) and image (columns): image 0 has 40 labelled pixels, image 1 has 60
    counts = np.array([[10, 0], [30, 60], [0, 0]])
    f0, f1 = 10 / 40, 90 / 100  # class 0 only in image 0; class 1 in both; class 2 in none
    median = (f0 + f1) / 2
    weights = median_frequency_weights(counts)
    assert weights[:2] == pytest.approx([median / f0, median / f1]) and np.isnan(weights[2])
    index = pd.DataFrame({"px_0": counts[0], "px_1": counts[1], "px_2": counts[2]})
    stats = class_statistics(index, ("a", "b", "c"))
    assert stats["median_frequency_weight"].iloc[:2].tolist() == pytest.approx(weights[:2].tolist())
    assert stats["pixels"].tolist() == [10, 90, 0] and stats["images"].tolist() == [1, 2, 0]
