"""Issue "Joins checked fold by fold and file by file": a check at a join compares all it joins (every image's
file name, every fold's record, every weight), not one representative value. One test (or more) per item;
each failed on the main before the issue (the note says how that was confirmed)."""

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch

from competition.core import checkpoint as ckpt
from competition.core.checkpoint import CheckpointError
from competition.core.config import ConfigError, parse_duration
from competition.core.config_file import config_from_dict
from competition.predictions.provenance import ProvenanceError, read_run
from tests.conftest import REPO, fake_oof_run, onehot, tiny_config_dict

ROOT = REPO


def _copy_run(trained_run, tmp_path, name=None):
    cfg, _ = trained_run
    run = tmp_path / "runs" / (name or cfg.name)
    shutil.copytree(cfg.output_dir / cfg.name, run)
    return run


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | changes))


# ------------------------------------------------------------ 1. probability files join by image file name
def _test_images_only(synthetic_data, tmp_path):
    """The test images in a folder of their own (the same relative names), and the test json's images."""
    test = json.loads(synthetic_data["test"].read_text())
    folder = tmp_path / "test_images"
    for image in test["images"]:
        (folder / image["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(synthetic_data["root"] / image["file_name"], folder / image["file_name"])
    return folder, test


def test_probability_files_are_joined_to_a_test_json_by_file_name_not_by_id(
    trained_run, synthetic_data, tmp_path
):
    """``predict --images DIR`` numbers images in path order; a json that numbers them otherwise used to get
    other images' masks, "validated"."""
    from competition.inference.ensemble import ensemble_probs
    from competition.inference.predict import predict

    cfg, _ = trained_run
    folder, test = _test_images_only(synthetic_data, tmp_path)
    direct = predict([cfg.output_dir / cfg.name], folder, folder, tmp_path / "direct.csv", workers=0,
                     progress=False, overlays=0, save_probs=tmp_path / "p.npz")  # fmt: skip
    shuffled = copy.deepcopy(test)  # the same images numbered 0..N-1 as predict numbers them, but in reverse
    order = sorted(shuffled["images"], key=lambda image: image["file_name"], reverse=True)
    new_id = {image["id"]: n for n, image in enumerate(order)}
    for image in shuffled["images"]:
        image["id"] = new_id[image["id"]]
    for ann in shuffled.get("annotations", []):
        ann["image_id"] = new_id[ann["image_id"]]
    (tmp_path / "shuffled.json").write_text(json.dumps(shuffled))
    ensembled = ensemble_probs([tmp_path / "p.npz"], tmp_path / "shuffled.json", tmp_path / "e.csv")

    def by_name(path):
        table = pd.read_csv(path)
        return dict(zip(table.iloc[:, 0], table.iloc[:, 1]))

    expected = by_name(direct["submission"])
    assert len(set(expected.values())) > 1  # the images do get different masks: the check can fail
    assert by_name(ensembled) == expected

    missing = copy.deepcopy(test)
    missing["images"][1]["file_name"] = "batch_09/not_there.jpg"
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    with pytest.raises(CheckpointError, match=r"no map of image 'batch_09/not_there.jpg'"):
        ensemble_probs([tmp_path / "p.npz"], tmp_path / "missing.json", tmp_path / "m.csv")
    resized = copy.deepcopy(test)
    resized["images"][2]["height"] = 32
    (tmp_path / "resized.json").write_text(json.dumps(resized))
    with pytest.raises(CheckpointError, match=rf"holds image '{test['images'][2]['file_name']}' at 64x64"):
        ensemble_probs([tmp_path / "p.npz"], tmp_path / "resized.json", tmp_path / "r.csv")
    data = dict(np.load(tmp_path / "p.npz"))
    del data["file_names"]  # a file of the older format: ids only
    np.savez(tmp_path / "old.npz", **data)
    with pytest.raises(CheckpointError, match="records no image file names"):
        ensemble_probs([tmp_path / "old.npz"], synthetic_data["test"], tmp_path / "o.csv")


def test_oof_files_of_two_runs_are_joined_by_file_name(tmp_path):
    """Two runs whose OOF files number the same images differently are joined image by image, and a run
    holding another image under a known id is refused by name."""
    from competition.predictions.oof import OofRuns

    probs = {"a": onehot([[0, 1]], 2), "b": onehot([[1, 1]], 2)}
    run1 = {0: {"1": (probs["a"], [[0, 1]])}, 1: {"2": (probs["b"], [[1, 1]])}}
    fake_oof_run(tmp_path, "r1", run1, ["x", "y"])
    run2 = fake_oof_run(tmp_path, "r2", {0: {"7": (probs["a"], [[0, 1]])}, 1: {"8": (probs["b"], [[1, 1]])}},
                        ["x", "y"])  # fmt: skip
    for fold, name in ((0, "1.png"), (1, "2.png")):  # the same files under other ids (7, 8)
        path = run2 / f"fold{fold}" / "oof.npz"
        data = dict(np.load(path))
        data["file_names"] = np.array([name])
        np.savez(path, **data)
    oof = OofRuns([tmp_path / "r1", run2])
    seen = {key: [p.argmax(0).tolist() for p in maps] for key, _, maps, _ in oof}
    assert seen == {"1": [[[0, 1]], [[0, 1]]], "2": [[[1, 1]], [[1, 1]]]}
    data = dict(np.load(run2 / "fold1" / "oof.npz"))
    data["file_names"] = np.array(["9.png"])
    np.savez(run2 / "fold1" / "oof.npz", **data)
    with pytest.raises(CheckpointError, match=r"images .* has none of \(first: '9.png'\)"):
        OofRuns([tmp_path / "r1", run2])


# ------------------------------------------------------------------------- 2. only fold<k> folders are folds
def test_a_backup_copy_of_a_fold_is_never_read_as_that_fold(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    shutil.copytree(run / "fold0", run / "fold0_old")
    _edit_json(run / "fold0_old" / "best.json", miou=0.99)  # what a stale copy would win with
    with pytest.warns(UserWarning, match="fold0_old is not read as a fold"):
        info = read_run(run)
    assert info.folds[0].dir == run / "fold0" and sorted(info.folds) == [0, 1]
    with pytest.warns(UserWarning):
        assert ckpt.fold_dirs(run) == [run / "fold0", run / "fold1"]
    shutil.rmtree(run / "fold0_old")
    shutil.copytree(run / "fold1", run / "fold2")  # a folder whose record names another fold
    with pytest.raises(CheckpointError, match=r"fold2/best.json records fold 1, but its folder is named"):
        read_run(run)


def test_a_bundle_loads_exactly_the_folders_its_manifest_lists(trained_run, tmp_path):
    from competition.inference.bundle import BundleError, export_bundle, read_bundle

    run = _copy_run(trained_run, tmp_path)
    export_bundle([run], tmp_path / "bundle")
    assert read_bundle(tmp_path / "bundle").runs == [tmp_path / "bundle" / "runs" / run.name]
    added = tmp_path / "bundle" / "runs" / run.name / "fold0_old"
    shutil.copytree(tmp_path / "bundle" / "runs" / run.name / "fold0", added)
    with pytest.raises(BundleError, match=r"fold0_old/\S+ is not part of the bundle"):
        read_bundle(tmp_path / "bundle")


# --------------------------------------------------------------------- 3. every fold of a run agrees
def test_every_fold_of_a_run_must_agree_on_folds_file_and_config(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    read_run(run)  # as trained: one run
    first = json.loads((run / "fold0" / "best.json").read_text())["folds_hash"]
    _edit_json(run / "fold1" / "best.json", folds_hash="0123456789abcdef")
    with pytest.raises(ProvenanceError, match=rf"fold 1 trained on another folds file than fold 0 "
                                              rf"\(0123456789abcdef vs {first}\)"):  # fmt: skip
        read_run(run)
    _edit_json(run / "fold1" / "best.json", folds_hash=first)
    config = (run / "fold1" / "config.yaml").read_text()
    (run / "fold1" / "config.yaml").write_text(config.replace("lr: 0.003", "lr: 0.001"))
    with pytest.raises(ProvenanceError, match=r"fold 1 was trained with another config.*\['optimizer.lr'\]"):
        read_run(run)
    (run / "fold1" / "config.yaml").write_text(config.replace("patience: null", "patience: 3"))
    read_run(run)  # a resume may change train.patience: still one run


def test_pseudo_sets_record_each_folds_own_teachers_and_students_check_them(
    trained_run, synthetic_data, tmp_path
):
    from competition.data.pseudo_labels import PseudoSet
    from competition.inference.pseudo import make_pseudo
    from competition.predictions.provenance import folds_record

    run = _copy_run(trained_run, tmp_path)
    made = make_pseudo([run], synthetic_data["root"], synthetic_data["test"], tmp_path / "p", workers=0,
                       progress=False)  # fmt: skip
    manifest = json.loads((made["dir"] / "pseudo.json").read_text())
    assert {k: [t["dir"] for t in v] for k, v in manifest["teachers"].items()} == {
        "0": [str((run / "fold0").resolve())], "1": [str((run / "fold1").resolve())]
    }  # fmt: skip
    folds_hash = folds_record(synthetic_data["folds"])["folds_hash"]
    pseudo, names = PseudoSet.read(made["dir"]), made["classes"]
    train_images = json.loads(synthetic_data["train"].read_text())["images"]
    labelled = [synthetic_data["root"] / train_images[0]["file_name"]]
    pseudo.check(names, labelled, 1, folds_hash)
    manifest["teachers"]["1"][0]["folds_hash"] = "another"
    (made["dir"] / "pseudo.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"fold 1's labels were made by .*fold1 \(fold 1, folds another\)"):
        PseudoSet.read(made["dir"]).check(names, labelled, 1, folds_hash)
    PseudoSet.read(made["dir"]).check(names, labelled, 0, folds_hash)  # fold 0's teachers are fine


# -------------------------------------------------------------- 4. nested means nested for dense CRF too
def test_crf_nested_score_votes_each_fold_with_the_weights_chosen_without_it(tmp_path, monkeypatch):
    """Run A is right on fold 1 and wrong on fold 0, run B the other way round. Weights chosen without fold
    0 are A's only, without fold 1 B's only: the nested score must vote fold 0 with A and fold 1 with B (all
    wrong), whatever the all-fold weights are (equal)."""
    from competition.core.metrics import confusion, miou_of
    from competition.oof import tune as crf
    from competition.predictions.oof import OofRuns

    pytest.importorskip("pydensecrf")
    target = {"0": [[0, 1, 1]], "1": [[1, 0, 1]], "2": [[0, 0, 1]], "3": [[1, 1, 0]]}
    wrong = {k: (1 - np.array(v)).tolist() for k, v in target.items()}
    folds = {0: ("0", "1"), 1: ("2", "3")}
    for name, right_fold in (("a", 1), ("b", 0)):
        items = {
            f: {k: (onehot(target[k] if f == right_fold else wrong[k], 2, 0.9), target[k]) for k in keys}
            for f, keys in folds.items()
        }
        fake_oof_run(tmp_path, name, items, ["bg", "x"])
    for key in target:
        cv2.imwrite(str(tmp_path / f"{key}.png"), np.zeros((1, 3, 3), np.uint8))
    monkeypatch.setattr(crf, "dense_crf", lambda image, probs, settings: probs)  # CRF that changes nothing
    oof = OofRuns([tmp_path / "a", tmp_path / "b"])
    files = {k: f"{k}.png" for k in target}
    fold_weights = {0: np.array([1.0, 0.0]), 1: np.array([0.0, 1.0])}
    tuned = crf.tune_crf(oof, files, tmp_path, [0.5, 0.5], crf.CRF_CANDIDATES[:1], False, fold_weights)
    by_hand = sum(confusion(np.array(wrong[k]), np.array(target[k]), 2, 255) for k in target)
    assert tuned.nested == pytest.approx(miou_of(by_hand)) and tuned.nested == 0.0
    assert tuned.in_sample > 0.0  # the equal-weight vote is right somewhere: the old "nested" score


# --------------------------------------------------------------------- 5. --init-from FILE is checked
def test_init_from_a_weights_file_is_checked_like_a_run_folder(trained_run, tmp_path):
    from competition.core.runtime import build_model
    from competition.train.resume import init_weights

    cfg, _ = trained_run
    fold0 = cfg.output_dir / cfg.name / "fold0" / "best.safetensors"
    assert ckpt.weights_origin(fold0)["fold"] == 0 and ckpt.weights_origin(fold0)["run"] == cfg.name

    def start(fold, source, **train):
        raw = cfg.model_dump(mode="json")
        raw["train"] |= {"init_from": str(source), **train}
        local = config_from_dict(raw)
        return init_weights(build_model(local, 11, pretrained=False), local, fold)

    start(0, fold0)  # fold 0's own model: it never saw fold 0's validation images
    with pytest.raises(ConfigError, match=r"is fold 0's model of run 'tiny': it trained on fold 1's valid"):
        start(1, fold0)
    start(1, fold0, init_any_folds=True)  # asked for
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(str(fold0)), str(foreign))  # no metadata
    with pytest.raises(ConfigError, match="does not record which images its model trained on"):
        start(0, foreign)
    start(0, foreign, init_any_folds=True)


# ----------------------------------------------------------------- 6. SWA averages exactly its window
def test_an_extended_run_averages_exactly_the_last_swa_epochs(synthetic_data, tmp_path):
    from competition.train.loop import FoldRun
    from competition.train.resume import run_config

    raw = tiny_config_dict(synthetic_data, tmp_path, epochs=3, oof="none", swa_epochs=2, keep="last")
    weights = []

    def keep(run):
        return lambda epoch, row: weights.append({k: v.clone() for k, v in run.model.state_dict().items()})

    run = FoldRun(config_from_dict(raw), 1)
    run.run(keep(run))
    extended = FoldRun(run_config(tmp_path / "tiny", ["train.epochs=4"]), 1, resume=True)
    extended.run(keep(extended))  # one epoch more: the window is epochs 3 and 4, not 2, 3 and 4
    kept = safetensors.torch.load_file(str(extended.run_dir / "best.safetensors"))
    assert len(weights) == 4
    for key in (k for k, v in weights[0].items() if v.is_floating_point()):
        torch.testing.assert_close(kept[key], (weights[2][key] + weights[3][key]) / 2, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ 7. weights are finite numbers
def test_weights_must_be_finite_non_negative_and_not_all_zero_wherever_they_are_read(tmp_path):
    from competition.oof.weights import search_weights
    from competition.predictions.weights_file import weights_for_runs

    items = {0: {"1": (onehot([[0, 1]], 2), [[0, 1]])}, 1: {"2": (onehot([[1, 1]], 2), [[1, 1]])}}
    runs = [fake_oof_run(tmp_path, name, items, ["x", "y"]) for name in ("a", "b")]
    with pytest.raises(ValueError, match=r"--step 2: the weight grid's spacing must be in \(0, 1\]"):
        search_weights(runs, step=2)
    with pytest.raises(ValueError, match=r"--step 0:"):
        search_weights(runs, step=0)
    with pytest.warns(UserWarning, match=r"--step 0.3 does not divide 1: searching with step 1/3"):
        found = search_weights(runs, step=0.3)
    assert sorted(found.table["w_a"].round(4).unique().tolist()) == [0.0, 0.3333, 0.5, 0.6667, 1.0]
    for bad, problem in (([float("nan")] * 2, "NaN"), ([0.0, 0.0], "all zero"), ([-1.0, 2.0], "negative")):
        path = tmp_path / "weights.json"
        path.write_text(json.dumps({"runs": ["a", "b"], "class_names": ["x", "y"], "weights": bad}))
        with pytest.raises(ValueError, match=rf"{path}: the weights .*{problem}"):
            weights_for_runs(path, runs)


# ---------------------------------------------------------------- 8. the time limit holds for a new fold
def test_a_new_fold_does_not_start_when_its_first_epoch_would_overrun_the_limit(synthetic_data, tmp_path):
    import time

    from competition.train.loop import train

    raw = tiny_config_dict(synthetic_data, tmp_path, epochs=1, time_limit=100)
    cfg = config_from_dict(raw)
    started = time.monotonic() - 95  # 5 s left of the command's 100
    results = train(cfg, "0", started=started, first_epoch_s=30.0)  # the preflight's guess: 30 s an epoch
    assert results[0].stopped == "time_limit" and len(results[0].metrics) == 0


def test_each_fold_is_budgeted_from_the_epochs_of_the_fold_before(synthetic_data, tmp_path, monkeypatch):
    from competition.train import loop as train_module
    from competition.train.loop import FoldResult

    calls = []

    def fake_fold(cfg, fold, resume, overwrite, deadline=None, first_epoch_s=None):
        calls.append((fold, first_epoch_s))
        return FoldResult(fold, tmp_path, 0.5, 1, pd.DataFrame({"seconds": [12.0 + fold, 7.0]}))

    monkeypatch.setattr(train_module, "train_fold", fake_fold)
    train_module.train(config_from_dict(tiny_config_dict(synthetic_data, tmp_path)), "all", first_epoch_s=3.0)
    assert calls == [(0, 3.0), (1, 12.0)]  # fold 1 budgets its first epoch as fold 0's slowest


def test_preflight_measures_a_step_for_the_first_epoch_budget(synthetic_data, tmp_path):
    from competition.train.preflight import preflight

    guess = preflight(config_from_dict(tiny_config_dict(synthetic_data, tmp_path)))
    assert 0 < guess < 600  # 12 images through one step of a tiny model


# ------------------------------------------------------- 9. models with side heads survive copy and pickle
@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_deep_supervision_side_heads_work_on_copies_and_pickles(arch):
    from smp_unet3p import create_model

    model = create_model(arch, "resnet18", encoder_weights=None, classes=3, deep_supervision=True)
    clone = copy.deepcopy(model).train()  # the usual per-fold pattern
    images = torch.rand(2, 3, 64, 64)
    optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
    out = clone(images)
    (out["masks"].mean() + sum(s.mean() for s in out["side_masks"])).backward()
    optimizer.step()
    restored = pickle.loads(pickle.dumps(clone))  # what torch.save(model) does
    clone.eval(), restored.eval()
    torch.testing.assert_close(restored(images), clone(images))
    restored.train()
    sides = restored(images)["side_masks"]
    assert len(sides) == len(out["side_masks"]) and all(s.shape == (2, 3, 64, 64) for s in sides)
    assert model(images)["side_masks"][0].shape == (2, 3, 64, 64)  # the original still records its own


# ----------------------------------------------------- 10. plausible mistakes get one line, not a traceback
def _cli(args, cwd, path=()):
    """``competition ARGS`` in a subprocess running this checkout's code (``path``: folders put first)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "competition.cli", *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, env=env, timeout=300)  # fmt: skip
    return done.returncode, done.stderr


def test_plausible_mistakes_end_in_one_line_naming_the_fix(tmp_path):
    items = {0: {"1": (onehot([[0, 1]], 2), [[0, 1]])}, 1: {"2": (onehot([[1, 1]], 2), [[1, 1]])}}
    runs = [fake_oof_run(tmp_path, name, items, ["x", "y"]) for name in ("a", "b")]
    post = tmp_path / "postprocess.json"
    post.write_text(json.dumps({"class_names": ["x", "y"], "provenance": {"kind": "postprocess"}}))
    blocked = tmp_path / "blocked" / "pydensecrf"  # an environment without the [crf] extra
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('No module named pydensecrf')\n")
    cases = [
        (["report", "--runs", *runs, "--weights-file", post, "--out", tmp_path / "r.html"], (),
         r"is not a weights.json \(it is a postprocess file\).*--postprocess"),
        (["evaluate", "--runs", *runs, "--search-weights", "--step", "0"], (), r"--step 0\.0: .*\(0, 1\]"),
        (["evaluate", "--runs", runs[0], "--tune-crf", tmp_path / "crf.json"], [blocked.parent],
         r'pip install "smp-unet3p\[crf\]"'),
    ]  # fmt: skip
    for args, path, message in cases:
        rc, err = _cli(args, tmp_path, path)
        assert rc == 1 and "Traceback" not in err, (args, err)
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
        assert pytest.importorskip("re").search(message, err), (message, err)


# ------------------------------------------------------------------------ what the docs and messages claim
def test_a_run_whose_first_fold_never_finished_an_epoch_can_be_resumed(synthetic_data, tmp_path):
    from competition.train.resume import run_config

    cfg = config_from_dict(tiny_config_dict(synthetic_data, tmp_path))
    cfg.run_dir(0).mkdir(parents=True)
    (cfg.run_dir(0) / "config.yaml").write_text(cfg.to_yaml())  # written before epoch 1 ends
    assert run_config(tmp_path / "tiny").name == "tiny"


def test_durations_read_a_bare_number_after_hours_as_minutes():
    assert parse_duration("8h30") == 8 * 3600 + 30 * 60
    assert parse_duration("8h30m") == parse_duration("8h30") and parse_duration("90m30") == 5430
    assert parse_duration("3600") == 3600 and parse_duration("1.5h") == 5400
    for bad in ("30s5", "5m3h", "8hh", "h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_oof_maps_keep_their_aspect_ratio_and_are_never_enlarged(tmp_path):
    from competition.predictions.oof import OofWriter

    with OofWriter(tmp_path / "oof.npz", "probs", 256, ["bg", "a"], 0, 255) as writer:
        for key, (h, w) in {"wide": (300, 450), "small": (200, 250)}.items():
            batch = {"image_id": [key], "file_name": [f"{key}.png"], "mask": torch.ones(1, h, w).long()}
            writer.add(batch, torch.rand(1, 2, h, w).softmax(1))
    data = np.load(tmp_path / "oof.npz")
    assert data["pred__wide"].shape == (2, 171, 256) and data["target__wide"].shape == (171, 256)
    assert data["pred__small"].shape == (2, 200, 250)
    assert data["sizes"].tolist() == [[300, 450], [200, 250]]
    assert data["file_names"].tolist() == ["wide.png", "small.png"]


def test_onnx_engine_pads_to_the_models_own_output_stride(synthetic_data, tmp_path):
    """A stride-16 model (encoder depth 4): eager predict pads to 16; the ONNX graph records 16 too."""
    pytest.importorskip("onnxruntime")
    from competition.inference.bundle import export_bundle
    from competition.inference.predictor import load_runs
    from competition.train.loop import train

    raw = tiny_config_dict(synthetic_data, tmp_path, epochs=1, oof="none")
    raw["model"]["params"] |= {"encoder_depth": 4}
    cfg = config_from_dict(raw)
    train(cfg, "0")
    export_bundle([tmp_path / "tiny"], tmp_path / "bundle", onnx=True, allow_partial=True)
    with pytest.warns(UserWarning):
        eager = load_runs([tmp_path / "tiny"], allow_partial=True).specs[0]
        onnx = load_runs([tmp_path / "bundle" / "runs" / "tiny"], allow_partial=True, engine="onnxruntime")
    assert eager.multiple == 16 and onnx.specs[0].multiple == 16
    assert onnx.specs[0].model.output_stride == 16


def test_every_test_the_reliability_page_cites_exists():
    import re

    text = (ROOT / "docs" / "reliability.md").read_text()
    cited, missing = 0, []
    for cell in re.findall(r"\|([^|]*test_\w+\.py::[^|]*)\|\s*$", text, re.M):
        module = None
        for part in re.split(r",\s*", cell.strip()):
            match = re.fullmatch(r"(test_\w+\.py)?::(test_\w+)", part.strip())
            if not match:
                continue
            module, name = match.group(1) or module, match.group(2)
            cited += 1
            found = list((ROOT / "tests").rglob(module))  # tests/ mirrors the packages: found by file name
            if len(found) != 1 or f"def {name}(" not in found[0].read_text():
                missing.append(f"{module}::{name}")
    assert cited > 50 and missing == []
