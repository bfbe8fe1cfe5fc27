"""Dense CRF post-processing (issue 23): the refinement, its nested tuning on OOF, the postprocess.json round
trip and predict applying it."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.conftest import fake_oof_run, onehot

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 not installed (the [crf] extra)")

from competition.cli import main  # noqa: E402
from competition.core.metrics import confusion, miou_of  # noqa: E402
from competition.oof.tune import CRF_CANDIDATES, tune_crf  # noqa: E402
from competition.predictions.crf import CrfSettings, dense_crf  # noqa: E402
from competition.predictions.oof import OofRuns  # noqa: E402
from competition.predictions.postprocess import PostProcess  # noqa: E402


def _scene(seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-colour image (left dark, right bright), its labels, and noisy probabilities that get ~15 % of
    the pixels wrong."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int64)
    labels[:, size // 2 :] = 1
    image = np.where(labels[..., None] == 1, 220, 30).astype(np.uint8).repeat(3, axis=2)
    flip = rng.random(labels.shape) < 0.15
    noisy = np.where(flip, 1 - labels, labels)
    probs = onehot(noisy, 2, confidence=0.6)
    return image, labels, probs


def test_dense_crf_cleans_noise_that_the_image_contradicts():
    image, labels, probs = _scene(0)
    refined = dense_crf(image, probs, CrfSettings())
    assert refined.shape == probs.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)
    before = (probs.argmax(0) == labels).mean()
    after = (refined.argmax(0) == labels).mean()
    assert before < 0.9 and after > 0.98
    big = cv2.resize(image, (64, 64), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_allclose(dense_crf(big, probs, CrfSettings()), refined, atol=1e-5)  # resized to the map
    with pytest.raises(ValueError, match="unknown CRF settings"):
        CrfSettings.from_dict({"bilateral_sigma": 3})
    with pytest.raises(ValueError, match="fractions of the longer side"):
        CrfSettings(bilateral_sxy=80)


def _oof_with_images(tmp_path, name: str, fold0_noise: float = 0.15):
    files, folds = {}, {0: {}, 1: {}}
    for i in range(4):
        image, labels, probs = _scene(i)
        if i < 2 and fold0_noise != 0.15:
            rng = np.random.default_rng(10 + i)
            probs = onehot(np.where(rng.random(labels.shape) < fold0_noise, 1 - labels, labels), 2, 0.6)
        key = f"{i}"
        cv2.imwrite(str(tmp_path / f"{name}_{i}.png"), image)
        files[key] = f"{name}_{i}.png"
        folds[0 if i < 2 else 1][key] = (probs, labels)
    return OofRuns([fake_oof_run(tmp_path, name, folds, ["left", "right"], file_names=files)]), files


def test_tune_crf_scores_each_fold_with_a_setting_chosen_without_it(tmp_path):
    oof, files = _oof_with_images(tmp_path, "a")
    candidates = [CrfSettings(bilateral_compat=10.0), CrfSettings(bilateral_srgb=1.0, bilateral_compat=0.5)]
    tuned = tune_crf(oof, files, tmp_path, candidates=candidates, progress=False)
    assert tuned.settings is not None and tuned.in_sample > tuned.baseline + 0.1
    # the nested score by hand: fold f refined with the setting chosen on the other fold
    per_fold = {f: np.zeros((2, 2, 2), np.int64) for f in (0, 1)}  # [plain, nested]
    for key, fold, probs, target in oof:
        image = cv2.imread(str(tmp_path / files[key]))[..., ::-1]
        setting = tuned.fold_settings[fold]
        refined = probs[0] if setting is None else dense_crf(image, probs[0], setting)
        per_fold[fold][0] += confusion(probs[0].argmax(0), target, 2, 255)
        per_fold[fold][1] += confusion(refined.argmax(0), target, 2, 255)
    assert tuned.nested == pytest.approx(miou_of(per_fold[0][1] + per_fold[1][1]))
    for fold, (plain, nested) in tuned.fold_scores.items():
        assert (plain, nested) == pytest.approx((miou_of(per_fold[fold][0]), miou_of(per_fold[fold][1])))
    # what fold 0 holds never changes the setting fold 0 is scored with
    other, files_b = _oof_with_images(tmp_path, "b", fold0_noise=0.45)
    changed = tune_crf(other, files_b, tmp_path, candidates=candidates, progress=False)
    assert changed.fold_settings[0] == tuned.fold_settings[0]
    assert changed.baseline != tuned.baseline


def test_a_crf_setting_round_trips_and_predict_applies_it(trained_run, synthetic_data, tmp_path, monkeypatch):
    import competition.predictions.crf
    from competition.core import checkpoint as ckpt

    cfg, _ = trained_run
    names = list(ckpt.read_best_meta(cfg.run_dir(0))["classes"])
    path = tmp_path / "postprocess.json"
    PostProcess(names, crf={"bilateral_sxy": 0.1, "iterations": 3}).save(path)
    loaded = PostProcess.load(path, names)
    assert CrfSettings.from_dict(loaded.crf) == CrfSettings(bilateral_sxy=0.1, iterations=3)
    seen = []

    def everything_class_2(image, probs, settings):
        seen.append((image.shape[:2], probs.shape[1:], settings))
        out = np.zeros_like(probs)
        out[2] = 1.0
        return out

    monkeypatch.setattr(competition.predictions.crf, "dense_crf", everything_class_2)
    run = str(cfg.output_dir / cfg.name)
    common = ["predict", "--runs", run, "--data-root", str(synthetic_data["root"]), "--test"]
    common += [str(synthetic_data["test"]), "--workers", "0", "--overlays", "0", "--tta", "none"]
    assert main([*common, "--out", str(tmp_path / "crf.csv"), "--postprocess", str(path)]) == 0
    rows = pd.read_csv(tmp_path / "crf.csv")
    assert len(seen) == len(rows) and all(s[0] == s[1] for s in seen)  # the image at the map's size
    assert seen[0][2] == CrfSettings(bilateral_sxy=0.1, iterations=3)
    assert all(set(text.split()) == {"2"} for text in rows["PredictionString"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"class_names": names, "crf": {"sxy": 3}}))
    with pytest.raises(ValueError, match="unknown CRF settings"):
        PostProcess.load(bad, names)


def test_evaluate_tune_crf_writes_a_postprocess_file_predict_reads(trained_run, tmp_path, capsys):
    cfg, _ = trained_run
    run = str(cfg.output_dir / cfg.name)
    out = tmp_path / "crf.json"
    assert main(["evaluate", "--runs", run, "--tune-crf", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nested gain per fold" in printed and f"-> {out}" in printed
    saved = json.loads(out.read_text())
    assert saved["crf"] is None or CrfSettings.from_dict(saved["crf"]) in CRF_CANDIDATES
    assert set(saved["scores"]) == {"oof_miou_plain", "oof_miou_in_sample", "oof_miou_nested"}
    assert saved["scores"]["oof_miou_in_sample"] >= saved["scores"]["oof_miou_plain"]
    assert saved["provenance"]["runs"][0]["name"] == cfg.name
    assert main(["evaluate", "--runs", run, "--tune-crf", str(out)]) == 1  # never overwritten silently
    assert "--overwrite" in capsys.readouterr().err


def test_tune_crf_s_no_crf_option_is_evaluate_s_soft_vote_on_exact_level_ties(tmp_path):
    """Three runs whose stored levels tie two classes exactly (159 + 143 + 45 = 82 + 73 + 192): the integer
    vote gives the first class, the float sums (normalised) give the second by rounding. The CRF tuner's
    "no CRF" score is evaluate's soft-vote row, not the float arg-max."""
    from competition.oof.scores import evaluate_oof

    pattern = [(159, 82), (143, 73), (45, 192)]  # each run's levels of classes 0 and 1; class 2 the rest
    files, runs = {}, []
    for r, (a, b) in enumerate(pattern):
        folds = {0: {}, 1: {}}
        for i in range(4):
            image, _, _ = _scene(i, size=16)
            labels = np.zeros((16, 16), np.int64)
            labels[:, 12:] = 1  # mostly "left": voting all "left" or all "right" scores apart
            cv2.imwrite(str(tmp_path / f"{i}.png"), image)
            files[f"{i}"] = f"{i}.png"
            probs = np.stack([np.full((16, 16), v / 255, np.float32) for v in (a, b, 255 - a - b)])
            folds[0 if i < 2 else 1][f"{i}"] = (probs, labels)
        runs.append(fake_oof_run(tmp_path, f"r{r}", folds, ["left", "right", "other"], file_names=files))
    oof = OofRuns(runs)
    tuned = tune_crf(oof, files, tmp_path, candidates=[CrfSettings()], progress=False)
    table = evaluate_oof(runs)
    soft = table[table["model"].str.startswith("soft vote")]["miou"].tolist()
    assert soft == [pytest.approx(tuned.baseline)]
    left = miou_of(sum(confusion(np.zeros((16, 16), np.int64), t, 3, 255) for _, _, _, t in oof))
    assert tuned.baseline == pytest.approx(left)  # every pixel voted "left", the first of the tied classes
