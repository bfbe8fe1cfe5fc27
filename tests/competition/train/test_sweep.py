"""Issue "Sweeps on an existing engine": ``competition sweep`` on Optuna: the space checked before any
trial, trials as ordinary runs, pruning at an epoch boundary with the checkpoint kept, failed trials recorded
with their reason, the best config runnable, and several worker processes on one study (SQLite, and
PostgreSQL when ``SWEEP_POSTGRES_URL`` names a server, as ``.ci/run`` starts one)."""

import os
import subprocess
import sys

import optuna
import pandas as pd
import pytest
import yaml

from competition.cli import main
from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict, load_config
from competition.train.sweep import check_space, read_space, sample, sweep
from tests.conftest import REPO, tiny_config_dict


def _base(synthetic_data, tmp_path, epochs=1):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(synthetic_data, tmp_path / "runs", epochs=epochs)))
    return path


def _space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_the_space_is_checked_before_any_trial(synthetic_data, tmp_path):
    base = _base(synthetic_data, tmp_path)
    space = _space(tmp_path, "optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\ntrain.epocs: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"train.epocs=1: .*Did you mean 'epochs'"):
        sweep(base, space, "typo", trials=1)
    assert not (tmp_path / "runs" / "typo").exists()
    with pytest.raises(ConfigError, match="either values"):
        read_space(_space(tmp_path, "optimizer.lr: {values: [1], low: 1}\n"))
    fine = _space(tmp_path, "optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    with pytest.raises(ConfigError, match=r"data\.root"):  # the data is checked once, not failed per trial
        sweep(base, fine, "nodata", trials=1, overrides=[f"data.root={tmp_path / 'nowhere'}"])
    assert not (tmp_path / "runs" / "nodata").exists()


def test_trials_are_runs_a_failed_one_is_recorded_and_the_best_config_trains(synthetic_data, tmp_path):
    base = _base(synthetic_data, tmp_path)
    # a plain ViT passes the config's checks but cannot feed the decoder: that trial fails, the sweep goes on
    space = _space(tmp_path, "model.encoder_name: [resnet18, tu-vit_tiny_patch16_224]\nmodel.params.cgm: "
                             "{values: [true], when: {model.arch: unet3plus}}\n")  # fmt: skip
    study = sweep(base, space, "s", trials=2, sampler=optuna.samplers.BruteForceSampler(seed=0))
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "FAIL"]
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "downsampling pattern" in failed.user_attrs["reason"]
    assert failed.params["model.encoder_name"] == "tu-vit_tiny_patch16_224"
    done = study.best_trial
    run = tmp_path / "runs" / "s" / f"trial_{done.number}"
    assert (run / "fold0" / "best.safetensors").is_file()
    assert load_config(run / "fold0" / "config.yaml").model.encoder_name == "resnet18"
    out = tmp_path / "best.yaml"
    assert main(["sweep", "--best", "nope", "--out", str(out), "--runs", str(tmp_path / "runs")]) == 1
    assert not (tmp_path / "runs" / "nope").exists() and not out.exists()  # no empty study.db made
    assert main(["sweep", "--best", "s", "--out", str(out), "--runs", str(tmp_path / "runs")]) == 0
    best = load_config(out)
    assert best.model.encoder_name == "resnet18" and best.name == "s_best" and best.model.params["cgm"]


def test_a_pruned_trial_stops_at_an_epoch_boundary_with_its_checkpoint(synthetic_data, tmp_path):
    base = _base(synthetic_data, tmp_path, epochs=3)
    space = _space(tmp_path, "optimizer.lr: [0.003]\n")
    study = sweep(base, space, "p", trials=1, pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.trials[0]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [0]
    assert trial.user_attrs["pruned"] == "after epoch 1 of fold 0"  # what the report's trial table shows
    fold = tmp_path / "runs" / "p" / "trial_0" / "fold0"
    assert (fold / "last.ckpt").is_file() and len(pd.read_csv(fold / "metrics.csv")) == 1


def _workers(base, space, storage, cwd, count=2):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "competition.cli", "sweep", "--config", str(base), "--space", str(space),
            "--study", "shared", "--trials", "3", "--storage", storage]  # fmt: skip
    pipe = subprocess.PIPE
    jobs = [subprocess.Popen(args, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True)
            for _ in range(count)]  # fmt: skip
    outs = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outs


def _check_shared(storage, runs):
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert 3 <= len(numbers) <= 4 and len(set(numbers)) == len(numbers)  # each worker stops at 3 in all
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    trained = sorted(p.name for p in runs.glob("trial_*"))
    assert trained == sorted(f"trial_{n}" for n in numbers)  # every trial trained once, in its own run


def test_two_workers_share_one_sqlite_study(synthetic_data, tmp_path):
    base = _base(synthetic_data, tmp_path)
    space = _space(tmp_path, "optimizer.lr: {low: 1.0e-3, high: 5.0e-3}\n")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    _workers(base, space, storage, tmp_path)
    _check_shared(storage, tmp_path / "runs" / "shared")


@pytest.mark.skipif(not os.environ.get("SWEEP_POSTGRES_URL"), reason="no PostgreSQL (SWEEP_POSTGRES_URL)")
def test_two_workers_share_one_postgresql_study(synthetic_data, tmp_path):
    url = os.environ["SWEEP_POSTGRES_URL"]
    try:
        optuna.delete_study(study_name="shared", storage=url)  # a study left by an earlier run
    except KeyError:
        pass
    base = _base(synthetic_data, tmp_path)
    space = _space(tmp_path, "optimizer.lr: {low: 1.0e-3, high: 5.0e-3}\n")
    _workers(base, space, url, tmp_path)
    _check_shared(url, tmp_path / "runs" / "shared")


def test_a_sweep_stopped_with_ctrl_c_resumes_its_trial_when_started_again(synthetic_data, tmp_path):
    import signal
    import time

    base = _base(synthetic_data, tmp_path, epochs=3)
    space = _space(tmp_path, "optimizer.lr: [0.003]\n")
    args = [sys.executable, "-m", "competition.cli", "sweep", "--config", str(base), "--space", str(space),
            "--study", "c", "--trials", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pipe = subprocess.PIPE
    job = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=pipe, stderr=pipe, text=True)
    metrics = tmp_path / "runs" / "c" / "trial_0" / "fold0" / "metrics.csv"
    deadline = time.monotonic() + 300
    while not metrics.is_file():
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.3)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 130 and "Traceback" not in err, err
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in done.stdout
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'runs' / 'c' / 'study.db'}")
    first, again = study.trials
    assert first.user_attrs["interrupted"] and again.state.name == "COMPLETE"
    assert again.user_attrs["run_dir"] == first.user_attrs["run_dir"]  # the same run, resumed
    assert pd.read_csv(metrics)["epoch"].tolist() == [1, 2, 3]


def test_the_readme_sweep_commands_run_as_written(synthetic_data, tmp_path, monkeypatch):
    """The README's sweep block on the synthetic data: its space file, the sweep (2 trials of a seconds-long
    model instead of 8 of tiny_cpu), the best config, its training and the study's report."""
    import re
    import shlex
    import shutil

    from tests.conftest import readme_command_lines

    text = (REPO / "README.md").read_text()
    space = re.search(r"```yaml\n(.*?)```", text[text.index("## Sweeps") :], re.S).group(1)
    (tmp_path / "space.yaml").write_text(space)
    data = tmp_path / "data"
    shutil.copytree(synthetic_data["root"], data, ignore=shutil.ignore_patterns(".mask_cache"))
    shutil.copy(data / "train.json", data / "train_all.json")
    monkeypatch.chdir(tmp_path)
    tiny = ["model.encoder_name=resnet18", "model.encoder_weights=null", "train.epochs=1", "train.workers=0",
            "train.progress=false", "augment.size=64", "model.params.decoder_cat_channels=8"]  # fmt: skip
    lines = readme_command_lines("## Sweeps")
    assert [shlex.split(line)[1] for line in lines] == ["sweep", "sweep", "train", "report"]
    for line in lines:
        for old, new in (("DATA", str(data)), ("--trials 8", "--trials 2"), ("--fold all", "--fold 0")):
            line = line.replace(old, new)
        args = shlex.split(line)[1:]
        if "--space" in args:
            args += [a for a in tiny if not a.startswith("model.params.decoder")]  # the space samples it
        if args[0] == "train":
            args += ["train.workers=0", "train.progress=false"]
        assert main(args) == 0, line
    assert len(list((tmp_path / "runs" / "lr").glob("trial_*"))) == 2
    assert (tmp_path / "runs" / "lr_best" / "fold0" / "best.json").is_file()
    assert "2 trials: 2 complete" in (tmp_path / "lr.html").read_text()


def test_list_values_are_searched_as_their_yaml_text(synthetic_data, tmp_path):
    """Optuna's categorical choices are scalars: a list value (a crop size, a scale range) is offered as its
    YAML text and set back as the list."""
    base = load_config(_base(synthetic_data, tmp_path))
    space = _space(tmp_path, "augment.scale: [[0.5, 2.0], [0.75, 1.5]]\naugment.size: [48, 64]\n")
    params = read_space(space)
    check_space(base, params)
    trial = optuna.trial.FixedTrial({"augment.scale": "[0.75, 1.5]", "augment.size": 64})
    overrides = sample(trial, params, base)
    assert overrides == ["augment.scale=[0.75, 1.5]", "augment.size=64"]
    cfg = config_from_dict(base.model_dump(mode="json"), overrides)
    assert cfg.augment.scale == (0.75, 1.5) and cfg.augment.size == 64
