import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from competition.cli import main
from competition.core.io import OutputExistsError
from competition.inference.predictor import (
    Ensemble,
    InferenceOptions,
    ModelSpec,
    apply_view,
    invert_view,
    parse_tta,
    sliding_window_probs,
    tta_probs,
)
from competition.oof.scores import evaluate_oof
from competition.oof.weights import search_weights
from competition.predictions.submission import (
    rle_decode,
    rle_encode,
    submission_rows,
    validate_submission,
    write_submission,
)
from competition.predictions.voting import soft_scores


def pixelwise_model(classes=3, seed=0):
    """A 1x1-conv model: translation- and flip/rotation-equivariant, so every TTA view must agree."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, classes, kernel_size=1).eval()


def constant_model(logits):
    conv = nn.Conv2d(3, len(logits), kernel_size=1)
    nn.init.zeros_(conv.weight)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor(logits))
    return conv.eval()


def test_every_view_is_undone_exactly():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)  # non-square
    for view in parse_tta("hflip,vflip,rot90"):
        assert torch.equal(invert_view(apply_view(x, view), view), x), view
    assert parse_tta("hflip,rot90") == ["identity", "hflip", "rot90", "rot180", "rot270"]
    with pytest.raises(ValueError, match="unknown TTA view 'diag'"):
        parse_tta("diag")


def test_tta_on_an_equivariant_model_equals_no_tta():
    spec = ModelSpec(pixelwise_model(), mean=None, std=None)
    images = torch.rand(2, 3, 64, 96)
    plain = tta_probs(spec, images, InferenceOptions())
    every = tta_probs(spec, images, InferenceOptions(views=parse_tta("hflip,vflip,rot90")))
    assert plain.shape == (2, 3, 64, 96)
    torch.testing.assert_close(every, plain, atol=1e-6, rtol=0)
    assert torch.allclose(plain.sum(1), torch.ones(2, 64, 96))


def test_tta_pads_to_the_stride_and_crops_back():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    probs = tta_probs(
        ModelSpec(Recorder(), None, None), torch.rand(1, 3, 50, 70), InferenceOptions(scales=[1.0, 0.5])
    )
    assert probs.shape == (1, 2, 50, 70)
    assert seen == [(1, 3, 64, 96), (1, 3, 32, 64)]  # 25x35 at scale 0.5 -> padded to 32x64


def test_sliding_window_equals_whole_image_for_a_translation_equivariant_model():
    spec = ModelSpec(pixelwise_model(), mean=None, std=None)
    images = torch.rand(1, 3, 150, 230)
    whole = tta_probs(spec, images, InferenceOptions())
    tiled = sliding_window_probs(
        spec, images, InferenceOptions(tile=64, overlap=16, views=["identity", "hflip"])
    )
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_probs(spec, images, InferenceOptions(tile=64, overlap=64))


def test_ensemble_weights_against_hand_numbers():
    a = ModelSpec(constant_model([0.0, 0.0]), None, None, weight=1.0)  # softmax 0.5 / 0.5
    b = ModelSpec(constant_model([float(np.log(3.0)), 0.0]), None, None, weight=3.0)  # 0.75 / 0.25
    probs = Ensemble([a, b])(torch.rand(1, 3, 32, 32))
    assert probs[0, :, 0, 0].tolist() == pytest.approx([0.25 * 0.5 + 0.75 * 0.75, 0.25 * 0.5 + 0.75 * 0.25])
    assert soft_scores([np.array([1.0, 0.0]), np.array([0.0, 1.0])], [1, 3]) == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="weights"):
        Ensemble([ModelSpec(constant_model([0.0]), weight=-1.0)])


def test_rle_round_trip_and_hand_example():
    assert rle_encode(np.array([[0, 1, 1], [0, 1, 0]])) == "2 2 5 1"
    rng = np.random.default_rng(0)
    for mask in (rng.integers(0, 2, (7, 9)), np.zeros((4, 4)), np.ones((4, 4))):
        assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)
    for bad, message in (("1 2 3", "odd"), ("15 5", "outside"), ("1 3 2 2", "overlap")):
        with pytest.raises(ValueError, match=message):
            rle_decode(bad, (4, 4))


@pytest.mark.parametrize("fmt", ["boostcamp", "rle"])
def test_submission_round_trip_through_the_validator(tmp_path, fmt):
    rng = np.random.default_rng(1)
    masks = {f"batch_01/{i:04d}.jpg": rng.integers(0, 11, (64, 48)).astype(np.uint8) for i in range(3)}
    rows = [r for name, m in masks.items() for r in submission_rows(name, m, fmt, size=32)]
    path = write_submission(rows, tmp_path / "s.csv", list(masks), 11, fmt, size=32)
    assert validate_submission(path, list(masks), 11, fmt, 32) == []
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    first = next(iter(masks))
    import cv2

    expected = cv2.resize(masks[first], (32, 32), interpolation=cv2.INTER_NEAREST)
    if fmt == "boostcamp":
        got = np.array(frame.loc[0, "PredictionString"].split(), dtype=np.uint8).reshape(32, 32)
    else:
        got = np.zeros((32, 32), np.uint8)
        for _, row in frame[frame["image_id"] == first].iterrows():
            got[rle_decode(row["EncodedPixels"], (32, 32)).astype(bool)] = int(row["class_id"])
    assert np.array_equal(got, expected)
    with pytest.raises(OutputExistsError):
        write_submission(rows, path, list(masks), 11, fmt, size=32)


def _write(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


IDS = ["a.jpg", "b.jpg"]
GOOD = "0 1 2 3"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("id,PredictionString\na.jpg,0 1 2 3\nb.jpg,0 1 2 3\n", "columns"),
        (f"image_id,PredictionString\na.jpg,{GOOD}\n", "1 rows, expected 2"),
        (f"image_id,PredictionString\nb.jpg,{GOOD}\na.jpg,{GOOD}\n", "expected 'a.jpg'"),
        (f"image_id,PredictionString\na.jpg,\nb.jpg,{GOOD}\n", "blank PredictionString"),
        (f"image_id,PredictionString\na.jpg,0 1 x 3\nb.jpg,{GOOD}\n", "'x' is not"),
        (f"image_id,PredictionString\na.jpg,0 1 nan 3\nb.jpg,{GOOD}\n", "'nan' is not"),
        (f"image_id,PredictionString\na.jpg,0 1 2\nb.jpg,{GOOD}\n", "3 values, expected 4"),
        (f"image_id,PredictionString\na.jpg,0 1 2 11\nb.jpg,{GOOD}\n", "class 11 >= 11"),
        (f"image_id,PredictionString\na.jpg,0 -1 2 3\nb.jpg,{GOOD}\n", "'-1' is not"),
        ("", "not a readable CSV"),
    ],
)
def test_validator_rejects_each_broken_kind(tmp_path, text, problem):
    problems = validate_submission(_write(tmp_path, text), IDS, 11, "boostcamp", size=2)
    assert problems and problem in " ".join(problems), problems


@pytest.mark.parametrize(
    "text, problem",
    [
        ("image_id,class_id,EncodedPixels\nz.jpg,1,1 2\n", "not in the test set"),
        ("image_id,class_id,EncodedPixels\na.jpg,0,1 2\n", "class_id 0 is the background"),
        ("image_id,class_id,EncodedPixels\na.jpg,11,1 2\n", "class_id '11' not in [0, 11)"),
        ("image_id,class_id,EncodedPixels\na.jpg,1,1 2 3\n", "odd"),
        ("image_id,class_id,EncodedPixels\na.jpg,1,3 9\n", "outside"),
        ("image_id,class_id,EncodedPixels\na.jpg,1,1 1\na.jpg,1,3 1\n", "duplicate"),
    ],
)
def test_validator_rejects_broken_rle(tmp_path, text, problem):
    problems = validate_submission(_write(tmp_path, text), IDS, 11, "rle", size=2)
    assert problems and problem in " ".join(problems), problems


def test_predict_ensemble_validate_evaluate_end_to_end(trained_run, synthetic_data, tmp_path, capsys):
    cfg, results = trained_run
    run = cfg.output_dir / cfg.name
    root, test = str(synthetic_data["root"]), str(synthetic_data["test"])
    out = tmp_path / "submission.csv"
    args = ["predict", "--runs", str(run), "--data-root", root, "--test", test, "--out", str(out)]
    args += ["--tta", "hflip", "--workers", "0", "--save-probs", str(tmp_path / "p.npz"), "--probs-size", "0"]
    assert main(args) == 0
    ids = [img["file_name"] for img in json.loads(synthetic_data["test"].read_text())["images"]]
    frame = pd.read_csv(out)
    assert frame["image_id"].tolist() == ids
    assert len(list((tmp_path / "submission_overlays").glob("batch_0*_test_*.png"))) == 4
    assert main(args) == 1  # exists: never overwritten silently
    assert "--overwrite" in capsys.readouterr().err

    again = tmp_path / "ensembled.csv"
    assert main(["ensemble", "--probs", str(tmp_path / "p.npz"), "--test", test, "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()  # one probability file averaged = the same argmax
    assert main(["validate", str(out), "--test", test]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text(out.read_text().replace(ids[0], "other.jpg"))
    assert main(["validate", str(bad), "--test", test]) == 1
    assert "expected" in capsys.readouterr().err

    table = evaluate_oof([run])
    for r in results:
        meta = json.loads((r.run_dir / "best.json").read_text())
        row = table[(table["model"] == cfg.name) & (table["folds"] == f"fold{r.fold}")]
        assert float(row["miou"].iloc[0]) == pytest.approx(meta["miou"], abs=2e-3)  # float16 OOF probs
    found = search_weights([run, run], step=0.5, per_image=None)  # every pixel: exact scores
    single = float(table[table["folds"] == "all folds"]["miou"].iloc[0])
    assert len(found.table) == 3 and found.in_sample == pytest.approx(single)
    assert found.nested == pytest.approx(single)  # a run with itself: every weight scores the same
    sampled = search_weights([run, run], step=0.5)  # 2048 of each image's 4096 pixels: an estimate
    assert sampled.in_sample == pytest.approx(single, abs=0.01)
