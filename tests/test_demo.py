import pandas as pd
import pytest

from competition.demo import run_demo
from competition.io import OutputExistsError
from competition.submission import validate_submission


def test_shortened_demo_runs_every_stage_and_learns(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, images=24, test_images=4, size=64, epochs=12, progress=False)
    for name in ("submission.csv", "test_probs.npz", "stats/class_stats.png", "data/folds.csv"):
        assert (out / name).is_file(), name
    for fold in range(3):
        assert (result["run_dir"] / f"fold{fold}" / "best.safetensors").is_file()
    rows = pd.read_csv(out / "submission.csv")
    assert len(rows) == 4 and rows["PredictionString"].str.split().str.len().eq(256 * 256).all()
    ids = rows["image_id"].tolist()
    assert validate_submission(out / "submission.csv", ids, 11) == []
    # the synthetic classes are learnable: clearly above predicting background everywhere
    assert result["oof_miou"] > result["chance_miou"] + 0.05, result
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_demo(out, images=24, size=64, epochs=1, progress=False)
