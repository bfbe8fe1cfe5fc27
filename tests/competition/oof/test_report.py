"""``competition report``: a self-contained HTML page, checked for its content and rendered in headless
Chromium (skipped cleanly where no Chromium is installed; .ci/run installs it)."""

import re
import subprocess

import cv2
import numpy as np
import pandas as pd
import pytest

from competition.cli import main
from competition.oof.report import build_report
from competition.oof.scores import evaluate_oof
from competition.predictions.submission import class_pixel_counts, rle_encode
from tests.conftest import BROWSER_FLAGS, browser, chromium_dom

SECTIONS = ("Config", "Training curves", "Best epoch per fold", "Out-of-fold scores", "Per-class IoU (OOF)",
            "Confusion matrix", "Worst 3 OOF images", "Submission class distribution")  # fmt: skip


def test_class_pixel_counts_of_both_submission_formats(tmp_path):
    boostcamp = tmp_path / "b.csv"
    pd.DataFrame({"image_id": ["a", "b"], "PredictionString": ["0 0 1 2", "2 2 2 0"]}).to_csv(
        boostcamp, index=False
    )
    assert class_pixel_counts(boostcamp, 4, "boostcamp").tolist() == [3, 1, 4, 0]
    mask = np.zeros((4, 4), np.uint8)
    mask[0, :3] = 1
    mask[2:, 2:] = 2
    rle = tmp_path / "r.csv"
    pd.DataFrame({"image_id": ["a", "a", "b"], "class_id": [1, 2, 2],
                  "EncodedPixels": [rle_encode(mask == 1), rle_encode(mask == 2), rle_encode(mask == 2)]}
                 ).to_csv(rle, index=False)  # fmt: skip
    assert class_pixel_counts(rle, 3, "rle", size=4).tolist() == [32 - 3 - 8, 3, 8]


@pytest.fixture(scope="module")
def report(trained_run, synthetic_data, tmp_path_factory):
    cfg, _ = trained_run
    out = tmp_path_factory.mktemp("report")
    rows = ["0 " * 255 + "1", "2 " * 256]  # two 16x16 "masks": 255 background + 1 class-1 pixel, 256 class 2
    submission = out / "submission.csv"
    pd.DataFrame({"image_id": ["x", "y"], "PredictionString": [r.strip() for r in rows]}).to_csv(
        submission, index=False
    )
    run = cfg.output_dir / cfg.name
    return build_report([run], out / "report.html", submission, size=16, worst=3), run


def test_report_holds_every_section_and_nothing_external(report):
    path, run = report
    page = path.read_text()
    for title in SECTIONS:
        assert f"<h2>{title}" in page, title
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 1 + 1 + 1 + 3 + 1  # curves, IoU bars, confusion, 3 worst panels, distribution
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    overall = evaluate_oof([run]).query("folds == 'all folds'")["miou"].iloc[0]
    assert f"{overall:.4f}" in page  # the OOF table is the evaluate stage's


def test_report_cli_refuses_to_overwrite(report, tmp_path, capsys):
    path, run = report
    assert main(["report", "--runs", str(run), "--out", str(path), "--worst", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["report", "--runs", str(run), "--out", str(tmp_path / "r.html"), "--worst", "1"]) == 0
    assert "file://" in capsys.readouterr().out


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _ = report
    assert 'data-images-ok="7/7"' in chromium_dom(path)  # the page's load handler: every image decoded
    shot = tmp_path / "shot.png"
    page = path.resolve().as_uri()
    command = [browser(), *BROWSER_FLAGS, "--window-size=1280,2400", f"--screenshot={shot}", page]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = cv2.imread(str(shot))
    assert image.shape[:2] == (2400, 1280)
    assert image.std() > 10  # not a blank page
    colours = np.unique(image.reshape(-1, 3)[::97], axis=0)
    assert len(colours) > 50  # text, tables and figures, not an error page of one or two colours
