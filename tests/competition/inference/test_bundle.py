"""The offline inference bundle (issue 24): export, predict from it (torch and onnxruntime), refusals."""

import json

import pandas as pd
import pytest

from competition.cli import main
from competition.inference.bundle import MANIFEST, read_bundle


def _predict(synthetic_data, out, *source):
    args = [
        "predict",
        *source,
        "--data-root",
        str(synthetic_data["root"]),
        "--test",
        str(synthetic_data["test"]),
    ]
    return main([*args, "--workers", "0", "--overlays", "0", "--tta", "hflip", "--out", str(out)])


def test_a_bundle_predicts_what_its_runs_predict_and_refuses_a_changed_file(
    trained_run, synthetic_data, tmp_path, capsys
):
    pytest.importorskip("onnxruntime")
    cfg, _ = trained_run
    run = cfg.output_dir / cfg.name
    bundle = tmp_path / "bundle"
    assert main(["export", "--runs", str(run), "--out", str(bundle), "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "2 folds" in printed and "max logit difference" in printed
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert {
        f"runs/{cfg.name}/fold{k}/{n}" for k in (0, 1) for n in ("best.safetensors", "model.onnx")
    } <= set(manifest["files"])
    assert not list(bundle.rglob("last.ckpt")) and not list(bundle.rglob("oof.npz"))  # training-only files
    assert any(line.startswith("torch==") for line in (bundle / "requirements.txt").read_text().splitlines())
    assert max(manifest["onnx_max_difference"].values()) <= 1e-4

    assert _predict(synthetic_data, tmp_path / "runs.csv", "--runs", str(run)) == 0
    assert _predict(synthetic_data, tmp_path / "bundle.csv", "--bundle", str(bundle)) == 0
    from_runs, from_bundle = pd.read_csv(tmp_path / "runs.csv"), pd.read_csv(tmp_path / "bundle.csv")
    pd.testing.assert_frame_equal(from_runs, from_bundle)  # the same submission, byte for byte in values
    assert (
        _predict(synthetic_data, tmp_path / "onnx.csv", "--bundle", str(bundle), "--engine", "onnxruntime")
        == 0
    )
    onnx = pd.read_csv(tmp_path / "onnx.csv")
    pixels = [(a.split(), b.split()) for a, b in zip(from_runs["PredictionString"], onnx["PredictionString"])]
    agree = sum(sum(x == y for x, y in zip(a, b)) for a, b in pixels) / sum(len(a) for a, _ in pixels)
    assert agree >= 0.999

    weights = bundle / f"runs/{cfg.name}/fold1/best.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert _predict(synthetic_data, tmp_path / "x.csv", "--bundle", str(bundle)) == 1
    assert "fold1/best.safetensors differs from the file the bundle was made with" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_export_refuses_what_it_cannot_pack(trained_run, tmp_path, capsys):
    cfg, _ = trained_run
    run = str(cfg.output_dir / cfg.name)
    assert main(["export", "--runs", run, run, "--out", str(tmp_path / "b")]) == 1
    assert "same name" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["export", "--runs", run, "--out", str(tmp_path / "c")]) == 0
    bundle = read_bundle(tmp_path / "c")
    assert bundle.runs == [tmp_path / "c" / "runs" / cfg.name]  # inside the bundle, not the original runs
    assert not bundle.onnx and bundle.weights == [1.0] and bundle.postprocess is None
    (tmp_path / "c" / MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="format None"):
        read_bundle(tmp_path / "c")
    both = ["--runs", run, "--bundle", str(tmp_path / "c"), "--images", str(tmp_path)]
    assert main(["predict", *both, "--out", str(tmp_path / "x.csv")]) == 1
    assert "give --runs or --bundle" in capsys.readouterr().err
