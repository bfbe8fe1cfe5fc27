import pandas as pd
import pytest

from competition.core.io import OutputExistsError
from competition.demo import run_demo
from competition.predictions.submission import validate_submission


def test_shortened_demo_runs_every_stage_and_learns(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, images=24, test_images=4, size=64, epochs=12, progress=False)
    for name in (
        "submission.csv",
        "test_probs.npz",
        "stats/class_stats.png",
        "data/folds.csv",
        "report.html",
    ):
        assert (out / name).is_file(), name
    for fold in range(3):
        assert (result["run_dir"] / f"fold{fold}" / "best.safetensors").is_file()
    rows = pd.read_csv(out / "submission.csv")
    assert len(rows) == 4 and rows["PredictionString"].str.split().str.len().eq(256 * 256).all()
    ids = rows["image_id"].tolist()
    assert validate_submission(out / "submission.csv", ids, 11) == []
    # the synthetic classes are learnable: clearly above predicting background everywhere
    assert result["oof_miou"] > result["chance_miou"] + 0.05, result
    assert (
        result["report"] == out / "report.html"
        and "Submission class distribution" in result["report"].read_text()
    )
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_demo(out, images=24, size=64, epochs=1, progress=False)


def test_demo_pseudo_round_trains_on_the_pseudo_set_and_writes_a_second_submission(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, images=12, test_images=3, size=64, epochs=1, progress=False, pseudo=True)
    second = result["pseudo"]
    manifest = pd.read_json(out / "pseudo_round1" / "pseudo.json", typ="series")
    assert len(manifest["images"]) == 3
    saved = (second["run_dir"] / "fold0" / "config.yaml").read_text()
    assert str(out / "pseudo_round1") in saved  # round 2 trained with data.extra
    assert (
        validate_submission(second["submission"], pd.read_csv(out / "submission.csv")["image_id"], 11) == []
    )
