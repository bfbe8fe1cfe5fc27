"""Issue 20, joins of artifacts made at different times: each artifact records what made it (provenance) and
every consumer checks what it joins. One test (or more) per item of the issue, each aimed at the old silent
behaviour; items 7, 9, 10, 11 and 13 are in ``test_joins_inputs.py`` and ``test_pseudo.py``."""

import json
import re
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from competition.cli import main
from competition.core.config_file import config_from_dict
from competition.inference.pseudo import make_pseudo
from competition.oof.tune import tune
from competition.oof.weights import search_weights
from competition.predictions.voting import combine
from competition.train.loop import train, train_fold
from tests.conftest import fake_oof_run, onehot, tiny_config_dict


def _run(cfg):
    return cfg.output_dir / cfg.name


def _oof_preds(path):
    data = np.load(path)
    return {k: data[k] for k in data.files if k.startswith("pred__")}


# ------------------------------------------------------------- 1. pseudo-labels keep OOF honest
def _relabel_fold(synthetic_data, fold, out):
    """A copy of the training json where every annotation of the images of ``fold`` has another class."""
    folds = pd.read_csv(synthetic_data["folds"], dtype={"image_id": str})
    ids = set(folds.loc[folds["fold"] == fold, "image_id"].astype(int))
    coco = json.loads(synthetic_data["train"].read_text())
    categories = [c["id"] for c in coco["categories"]]
    for ann in coco["annotations"]:
        if ann["image_id"] in ids:
            ann["category_id"] = categories[(categories.index(ann["category_id"]) + 1) % len(categories)]
    out.write_text(json.dumps(coco))
    return out


def test_fold_matched_pseudo_labels_leave_a_folds_oof_independent_of_its_own_labels(synthetic_data, tmp_path):
    """Change only fold 0's labels and retrain teachers and students: with fold-matched pseudo-labels (the
    default) fold 0's OOF probabilities do not move; with pooled ones (every fold model labels) they do."""
    root, test = synthetic_data["root"], synthetic_data["test"]
    relabelled = _relabel_fold(synthetic_data, 0, tmp_path / "relabelled.json")
    raws, teachers = {}, {}
    for version, annotations in (("orig", synthetic_data["train"]), ("relab", relabelled)):
        raws[version] = tiny_config_dict(synthetic_data, tmp_path / version, epochs=1)
        raws[version]["data"]["annotations"] = str(annotations)
        teachers[version] = config_from_dict({**raws[version], "name": "teacher"})
        train(teachers[version], "all")

    def student_oof(version, kind, **pooled):
        made = make_pseudo([_run(teachers[version])], root, test, tmp_path / version / kind, threshold=0.5,
                           workers=0, progress=False, **pooled)  # fmt: skip
        overrides = [f"data.extra=[{made['dir']}]"] + (["data.extra_pooled=true"] if pooled else [])
        student = config_from_dict({**raws[version], "name": f"student_{kind}"}, overrides)
        train(student, "0")
        return _oof_preds(student.run_dir(0) / "oof.npz")

    matched = {version: student_oof(version, "matched") for version in raws}  # the defaults
    for key, value in matched["orig"].items():
        np.testing.assert_array_equal(value, matched["relab"][key])
    pooled = {version: student_oof(version, "pooled", pooled=True) for version in raws}
    moved = max(
        float(np.abs(v.astype(np.float32) - pooled["relab"][k]).max()) for k, v in pooled["orig"].items()
    )
    assert moved > 1e-3  # the leak the default closes: fold 1's teacher saw fold 0's labels


def test_pooled_sets_need_consent_and_matched_sets_their_folds_file(trained_run, synthetic_data, tmp_path):
    cfg, _ = trained_run
    root, test = synthetic_data["root"], synthetic_data["test"]
    pooled = make_pseudo([_run(cfg)], root, test, tmp_path / "p", workers=0, progress=False, pooled=True)
    raw = tiny_config_dict(synthetic_data, tmp_path / "runs")
    from competition.core.config import ConfigError
    from competition.data.splits import build_datasets

    with pytest.raises(ConfigError, match="pooled.*data.extra_pooled=true"):
        build_datasets(config_from_dict(raw, [f"data.extra=[{pooled['dir']}]"]), 0)
    matched = make_pseudo([_run(cfg)], root, test, tmp_path / "m", workers=0, progress=False)
    other_folds = tmp_path / "folds.csv"
    table = pd.read_csv(synthetic_data["folds"])
    table["fold"] = 1 - table["fold"]
    table.to_csv(other_folds, index=False)
    raw["data"]["folds"] = str(other_folds)
    with pytest.raises(ConfigError, match="teachers trained on another folds file"):
        build_datasets(config_from_dict(raw, [f"data.extra=[{matched['dir']}]"]), 0)


def test_a_pseudo_set_without_confident_object_pixels_warns_what_to_do(trained_run, synthetic_data, tmp_path):
    cfg, _ = trained_run
    with pytest.warns(UserWarning, match=r"no confident object pixel.*lower --threshold"):
        make_pseudo([_run(cfg)], synthetic_data["root"], synthetic_data["test"], tmp_path / "p",
                    threshold=0.999999, workers=0, progress=False)  # fmt: skip


# ------------------------------------------------------ 2. incomplete runs are never ensembled silently
def test_unfinished_or_missing_folds_are_refused_by_every_consumer(
    trained_run, synthetic_data, tmp_path, capsys
):
    cfg, _ = trained_run
    run = tmp_path / "runs" / cfg.name
    shutil.copytree(_run(cfg), run)
    local = cfg.model_copy(update={"output_dir": tmp_path / "runs"})

    def interrupt(epoch, row):
        raise KeyboardInterrupt  # Ctrl-C after epoch 1 of fold 1

    with pytest.raises(KeyboardInterrupt):
        train_fold(local, 1, overwrite=True, on_epoch_end=interrupt)
    missing = tmp_path / "runs" / "missing"
    shutil.copytree(run, missing, ignore=shutil.ignore_patterns("fold1"))
    inputs = [
        "--data-root",
        str(synthetic_data["root"]),
        "--test",
        str(synthetic_data["test"]),
        "--workers",
        "0",
    ]
    commands = {
        "predict": ["predict", *inputs, "--out", str(tmp_path / "s.csv"), "--overlays", "0"],
        "pseudo": ["pseudo", *inputs, "--out", str(tmp_path / "ps")],
        "evaluate": ["evaluate"],
        "report": ["report", "--out", str(tmp_path / "r.html")],
        "audit": ["audit", "--out", str(tmp_path / "audit")],
    }  # fmt: skip
    for name, args in commands.items():
        for bad, says in ((run, r"fold 1 finished 1 of 2 epochs"), (missing, r"fold\(s\) \[1\] .* missing")):
            assert main([*args, "--runs", str(bad)]) == 1, name
            err = capsys.readouterr().err
            assert "incomplete runs" in err and "--allow-partial" in err, (name, err)
            assert re.search(says, err), (name, err)
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "ps").exists()
    from competition.predictions.provenance import sidecar

    assert main([*commands["predict"], "--runs", str(run), "--allow-partial"]) == 0
    assert "warning: --allow-partial:" in capsys.readouterr().err
    recorded = json.loads(sidecar(tmp_path / "s.csv").read_text())
    assert recorded["kind"] == "submission" and "fold 1 finished 1 of 2 epochs" in recorded["partial"][0]
    assert recorded["runs"][0]["epochs"] == {"0": [2, 2], "1": [1, 2]}


# ------------------------------------------------------- 3. weights go to the runs they were chosen for
def _two_fake_runs(tmp_path):
    """Runs ``a`` (right everywhere, unsure) and ``b`` (wrong everywhere, sure) on 2 folds of 4x4 images."""
    classes = ["bg", "x", "y"]
    target = np.zeros((4, 4), np.int64)
    target[:2] = 1
    wrong = np.full((4, 4), 2)
    runs = []
    for name, pred, sure in (("a", target, 0.6), ("b", wrong, 0.9)):
        folds = {f: {f"{f}{i}": (onehot(pred, 3, sure), target) for i in range(2)} for f in (0, 1)}
        runs.append(fake_oof_run(tmp_path, name, folds, classes))
    return runs


def _probs_file(path, run, label, classes=("bg", "x", "y"), keys=("1", "2")):
    """A ``predict --save-probs`` file of ``run`` predicting ``label`` everywhere (with its provenance)."""
    from competition.predictions.provenance import KEY, read_run, record, to_npz

    block = record("probs", [read_run(run)], list(classes), size=None, partial=[])
    arrays = {f"pred__{k}": onehot(np.full((4, 4), label), len(classes), 0.9) for k in keys}
    images = {"image_ids": np.array(list(keys)), "file_names": np.array([f"t{k}.png" for k in keys])}
    images["sizes"] = np.array([[4, 4]] * len(keys))  # as _test_json lists them
    np.savez(path, **arrays, **images, class_names=np.array(classes), **{KEY: to_npz(block)})
    return path


def _test_json(tmp_path, keys=("1", "2"), size=(4, 4)):
    images = [{"id": int(k), "file_name": f"t{k}.png", "height": size[0], "width": size[1]} for k in keys]
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    return path


def test_weights_file_is_matched_to_probability_files_by_run_not_by_position(tmp_path, capsys):
    a, b = _two_fake_runs(tmp_path)
    weights = tmp_path / "weights.json"
    assert (
        main(["evaluate", "--runs", str(a), str(b), "--search-weights", "--save-weights", str(weights)]) == 0
    )
    saved = json.loads(weights.read_text())
    assert saved["runs"] == ["a", "b"] and saved["weights"][0] > 0.6  # run a is the one to trust
    assert [r["name"] for r in saved["provenance"]["runs"]] == ["a", "b"]
    pa, pb = _probs_file(tmp_path / "a.npz", a, 1), _probs_file(tmp_path / "b.npz", b, 2)
    test = _test_json(tmp_path)
    outs = {}
    for order in ((pa, pb), (pb, pa)):
        out = tmp_path / f"{order[0].stem}_first.csv"
        args = ["ensemble", "--probs", *map(str, order), "--weights-file", str(weights), "--test", str(test)]
        assert main([*args, "--out", str(out), "--size", "0"]) == 0
        outs[order[0].stem] = out.read_text()
    assert outs["a"] == outs["b"]  # the order of the files does not matter
    assert set(pd.read_csv(tmp_path / "b_first.csv")["PredictionString"]) == {" ".join(["1"] * 16)}  # a's say
    stranger = tmp_path / "runs2"
    c = fake_oof_run(stranger, "c", {0: {}}, ["bg", "x", "y"])
    pc = _probs_file(tmp_path / "c.npz", c, 1)
    args = ["ensemble", "--probs", str(pa), str(pc), "--weights-file", str(weights), "--test", str(test)]
    assert main([*args, "--out", str(tmp_path / "x.csv")]) == 1
    assert "comes from run 'c'" in capsys.readouterr().err
    assert main(["ensemble", "--probs", str(pa), "--weights-file", str(weights), "--test", str(test),
                 "--out", str(tmp_path / "y.csv")]) == 1  # fmt: skip
    assert "nothing given of ['b']" in capsys.readouterr().err


# --------------------------------------------------------------------------- 4. nested means nested
def _speck_runs(tmp_path, fold0_b_wrong):
    """Folds 1 and 2: run ``a`` adds 1-pixel specks of ``x`` (voted in when a's weight > 0.56), run ``b``
    misses a row of the square (voted out when a's weight < 0.4): equal weights are perfect there, and
    min-area filtering only helps when a's weight is high. Fold 0 decides the weights chosen on all folds:
    ``b`` wrong everywhere there pushes them to ``a``."""
    target = np.zeros((16, 16), np.int64)
    target[4:10, 4:10] = 1
    folds_a, folds_b = {}, {}
    for fold in (0, 1, 2):
        pa, pb = onehot(target, 2, 0.8), onehot(target, 2, 0.7)
        if fold > 0:
            for y, x in ((1, 1), (13, 2), (12, 13)):
                pa[:, y, x] = (0.1, 0.9)
                pb[:, y, x] = (1.0, 0.0)
            pb[:, 9, 4:10] = np.array([0.7, 0.3])[:, None]
        elif fold0_b_wrong:
            pb = onehot(1 - target, 2, 1.0)
        folds_a[fold] = {f"{fold}{i}": (pa, target) for i in range(2)}
        folds_b[fold] = {f"{fold}{i}": (pb, target) for i in range(2)}
    return [
        fake_oof_run(tmp_path, "a", folds_a, ["bg", "x"]),
        fake_oof_run(tmp_path, "b", folds_b, ["bg", "x"]),
    ]


def test_nested_postprocess_score_repeats_the_weight_search_without_the_fold(tmp_path):
    chosen = {}
    for version in (True, False):
        runs = _speck_runs(tmp_path / str(version), fold0_b_wrong=version)
        found = search_weights(runs)
        nested = tune(runs, found.weights, found.fold_weights)
        leaky = tune(runs, found.weights)  # post-processing tuned on the all-folds weights
        chosen[version] = (
            found.weights,
            found.fold_weights[0],
            nested.fold_postprocess[0],
            leaky.fold_postprocess[0],
        )
    (w1, f1, n1, l1), (w2, f2, n2, l2) = chosen[True], chosen[False]
    assert w1[0] > 0.6 and np.allclose(w2, [0.5, 0.5])  # fold 0 moves the all-folds weights ...
    np.testing.assert_array_equal(f1, f2)  # ... not those chosen without it
    assert n1.min_area == n2.min_area == {}  # fold 0's nested setting never sees fold 0
    assert l1.min_area != l2.min_area  # with the all-folds weights it would (the old behaviour)


def test_cli_tunes_postprocessing_on_the_nested_weights(tmp_path, capsys):
    runs = _speck_runs(tmp_path, fold0_b_wrong=True)
    out = tmp_path / "pp.json"
    args = ["evaluate", "--runs", *map(str, runs), "--search-weights", "--tune-postprocess", str(out)]
    assert main(args) == 0
    saved = json.loads(out.read_text())
    found = search_weights(runs)
    assert saved["scores"]["oof_miou_nested"] == pytest.approx(
        tune(runs, found.weights, found.fold_weights).nested
    )
    assert saved["provenance"]["nested_weights"] is True and saved["provenance"]["kind"] == "postprocess"


# ------------------------------------------------------------------------- 5. zero weight means no say
def test_a_member_of_weight_zero_does_not_break_hard_vote_ties():
    # members 0 and 1 split the vote at every pixel; member 2 (weight 0) backs member 1's class strongly
    p0 = np.array([0.1, 0.6, 0.3], np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    p1 = np.array([0.1, 0.35, 0.55], np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    p2 = np.array([0.0, 0.0, 1.0], np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    assert (combine([p0, p1, p2], np.array([0.5, 0.5, 0.0]), "hard") == 1).all()  # 0.95 vs 0.85 weighted
    assert (combine([p0, p1, p2], None, "hard") == 2).all()  # with equal weights member 2 decides


# ------------------------------------------------------------------------- 6. ties prefer equal weights
def test_two_equally_good_runs_get_equal_weights(tmp_path):
    target = np.zeros((4, 4), np.int64)
    target[1:3] = 1
    folds = {f: {f"{f}{i}": (onehot(target, 2, 0.9), target) for i in range(2)} for f in (0, 1)}
    runs = [fake_oof_run(tmp_path, name, folds, ["bg", "x"]) for name in ("a", "b")]
    found = search_weights(runs)
    np.testing.assert_allclose(found.weights, [0.5, 0.5])
    for weights in found.fold_weights.values():
        np.testing.assert_allclose(weights, [0.5, 0.5])
    three = search_weights([*runs, fake_oof_run(tmp_path, "c", folds, ["bg", "x"])])
    np.testing.assert_allclose(three.weights, [1 / 3] * 3)  # equal weights even when off the 0.1 grid


# --------------------------------------------------------------------------------- 8. native size
def test_native_size_agrees_in_predict_ensemble_and_validate(trained_run, synthetic_data, tmp_path):
    cfg, _ = trained_run
    test = json.loads(synthetic_data["test"].read_text())
    first = test["images"][0]
    image = cv2.imread(str(synthetic_data["root"] / first["file_name"]))
    cv2.imwrite(str(tmp_path / "wide.png"), image[:40])  # 40 x 64: not square, not a multiple of 32
    shutil.copy(synthetic_data["root"] / first["file_name"], tmp_path / "square.jpg")
    images = [{"id": 1, "file_name": "wide.png", "height": 40, "width": 64},
              {"id": 2, "file_name": "square.jpg", "height": 64, "width": 64}]  # fmt: skip
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps({**test, "images": images}))
    for fmt in ("rle", "boostcamp"):
        direct, again, probs = tmp_path / f"{fmt}.csv", tmp_path / f"{fmt}_ens.csv", tmp_path / f"{fmt}.npz"
        common = ["--test", str(test_json), "--size", "0", "--format", fmt]
        assert (
            main(
                [
                    "predict",
                    "--runs",
                    str(_run(cfg)),
                    "--data-root",
                    str(tmp_path),
                    *common,
                    "--out",
                    str(direct),
                    "--save-probs",
                    str(probs),
                    "--workers",
                    "0",
                    "--overlays",
                    "0",
                ]
            )
            == 0
        )
        assert np.load(probs)["pred__1"].shape[1:] == (40, 64)  # saved at native size too
        assert main(["ensemble", "--probs", str(probs), *common, "--out", str(again)]) == 0
        assert again.read_text() == direct.read_text()
        assert main(["validate", str(direct), *common]) == 0
    rows = pd.read_csv(tmp_path / "boostcamp.csv")
    assert [len(s.split()) for s in rows["PredictionString"]] == [40 * 64, 64 * 64]
    (tmp_path / "short.csv").write_text("image_id,PredictionString\nwide.png,0 0\nsquare.jpg,0\n")
    assert main(["validate", str(tmp_path / "short.csv"), "--test", str(test_json), "--size", "0"]) == 1


# ------------------------------------------------------------------ 12. report shows what was submitted
def test_report_scores_the_vote_of_the_weights_file(trained_run, tmp_path):
    cfg, _ = trained_run
    runs = tmp_path / "runs"
    shutil.copytree(_run(cfg), runs / "tiny")
    shutil.copytree(_run(cfg), runs / "tiny2")
    for config in (runs / "tiny2").glob("fold*/config.yaml"):
        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**raw, "name": "tiny2"}, sort_keys=False))
    weights = tmp_path / "weights.json"
    assert main(["evaluate", "--runs", str(runs / "tiny"), str(runs / "tiny2"), "--search-weights",
                 "--save-weights", str(weights)]) == 0  # fmt: skip
    saved = json.loads(weights.read_text())
    saved["weights"] = [1.0, 0.0]  # the submission trusted run "tiny" alone
    weights.write_text(json.dumps(saved))
    out = tmp_path / "report.html"
    args = ["report", "--runs", str(runs / "tiny2"), str(runs / "tiny"), "--weights-file", str(weights)]
    assert main([*args, "--out", str(out)]) == 0
    assert "soft vote 0.00+1.00" in out.read_text()  # matched by run name: tiny2 gets 0, tiny gets 1
