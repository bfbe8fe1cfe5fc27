"""``competition report --study``: a sweep's trials in the HTML report (counts by state, the best trial, the
history and per-epoch curves, the parameters' importance, every trial with its failure reason or pruning
epoch), on a study written straight into the sweep's default SQLite storage; rendered in headless Chromium."""

import math
import re

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from competition.cli import main
from competition.core.config import ConfigError
from competition.train.sweep import storage_of
from competition.train.trials import importances, load_study, state_counts, trial_frame
from tests.conftest import browser, chromium_dom

SPACE = {"optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True),
         "model.encoder_name": CategoricalDistribution(["a", "b"])}  # fmt: skip


def _add(study, lr, enc, state=TrialState.COMPLETE, value=None, curve=None, **attrs):
    params = {"optimizer.lr": lr, "model.encoder_name": enc}
    study.add_trial(create_trial(state=state, params=params, distributions=SPACE, value=value,
                                 intermediate_values=curve, user_attrs=attrs))  # fmt: skip


@pytest.fixture
def study_dir(tmp_path, monkeypatch):
    """Study ``s`` in ``runs/s/study.db`` (the sweep's default): 10 completed trials whose score follows the
    learning rate only, one pruned after 2 epochs, one failed with its reason."""
    monkeypatch.chdir(tmp_path)
    storage = storage_of(None, tmp_path / "runs", "s")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    grid = [(1e-4, "a"), (1e-3, "b"), (1e-2, "a"), (3e-2, "b"), (3e-4, "b"), (3e-3, "a"), (2e-3, "b"),
            (5e-4, "a"), (6e-3, "b"), (2e-2, "a")]  # fmt: skip
    for n, (lr, enc) in enumerate(grid):
        score = 0.3 + 0.1 * (4 + math.log10(lr))  # 0.3 at 1e-4 ... 0.6 at 1e-1
        _add(study, lr, enc, value=score, curve={0: score / 2, 1: score}, run_dir=f"runs/s/trial_{n}",
             overrides=[f"optimizer.lr={lr}"])  # fmt: skip
    _add(study, 2e-4, "a", TrialState.PRUNED, curve={0: 0.01, 1: 0.02}, pruned="after epoch 2 of fold 0",
         run_dir="runs/s/t10")  # fmt: skip
    _add(study, 5e-2, "b", TrialState.FAIL, reason="FloatingPointError: loss is nan", run_dir="runs/s/t11")
    return tmp_path


def test_the_study_is_read_back_trial_by_trial(study_dir):
    study = load_study("s")
    assert state_counts(study) == {"complete": 10, "pruned": 1, "fail": 1, "running": 0, "waiting": 0}
    frame = trial_frame(study)
    assert frame["trial"].tolist() == list(range(12))
    assert frame["epochs"].tolist() == [2] * 11 + [0]
    assert frame.loc[10, "note"] == "after epoch 2 of fold 0" and frame.loc[10, "state"] == "pruned"
    assert frame.loc[11, "note"] == "FloatingPointError: loss is nan" and frame.loc[11, "state"] == "fail"
    assert frame.loc[3, "mIoU"] == pytest.approx(0.3 + 0.1 * (4 + -1.5228787), abs=1e-6)
    found = importances(study)
    assert set(found) == {"optimizer.lr", "model.encoder_name"}
    assert found["optimizer.lr"] > 0.9  # the score follows the learning rate alone
    assert sum(found.values()) == pytest.approx(1.0)


def test_a_missing_study_names_what_the_storage_holds(study_dir):
    with pytest.raises(ConfigError, match=r"no study 'x' at runs/x/study.db"):
        load_study("x")
    with pytest.raises(ConfigError, match=r"no study 'x' in sqlite:///.*; it holds \['s'\]"):
        load_study("x", f"sqlite:///{study_dir / 'runs' / 's' / 'study.db'}")


def test_report_study_shows_counts_best_history_importance_and_every_trial(study_dir, capsys):
    assert main(["report", "--study", "s", "--out", "study.html"]) == 0
    page = (study_dir / "study.html").read_text()
    assert "12 trials: 10 complete, 1 pruned, 1 fail" in page
    assert "best trial 3: mIoU 0.5477" in page and "optimizer.lr=0.03" in page
    for title in ("Sweep s: trials", "Sweep history", "Parameter importance", "Every trial"):
        assert f"<h2>{title}</h2>" in page, title
    assert "FloatingPointError: loss is nan" in page and "after epoch 2 of fold 0" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2  # the history and the importance figures
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page


def test_report_study_with_too_few_completed_trials_says_why_importance_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = optuna.create_study(study_name="t", storage=storage_of(None, tmp_path / "runs", "t"))
    _add(study, 1e-3, "a", value=0.4, curve={0: 0.4})
    assert main(["report", "--study", "t", "--out", "t.html"]) == 0
    page = (tmp_path / "t.html").read_text()
    assert "needs 3 completed trials in which a parameter varies (1 completed)" in page
    assert main(["report", "--out", "none.html"]) == 1  # neither runs nor a study


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_study_renders_in_headless_chromium(study_dir):
    assert main(["report", "--study", "s", "--out", "study.html"]) == 0
    dom = chromium_dom(study_dir / "study.html")
    assert 'data-images-ok="2/2"' in dom  # the page's load handler: both figures decoded
