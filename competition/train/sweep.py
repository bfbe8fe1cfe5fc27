"""The ``sweep`` stage: a hyper-parameter search on Optuna, each trial an ordinary run.

A search space is YAML over dotted config keys::

    model.encoder_name: [resnet18, tu-efficientnet_lite0]        # categorical
    optimizer.lr: {low: 1.0e-4, high: 3.0e-3, log: true}         # float range
    model.params.decoder_cat_channels: {low: 16, high: 64, step: 16, int: true}
    model.params.cgm: {values: [true, false], when: {model.arch: unet3plus}}   # only for that architecture
    augment.scale: [[0.5, 2.0], [0.75, 1.5]]                     # list values: Optuna sees their YAML text

Every key and every value of it is checked against the base config (with the config's own did-you-mean)
before any trial. Trial ``n`` is the run ``<output_dir>/<study>/trial_<n>`` (full config, provenance,
resumable), trained with the base config plus the sampled overrides. After each epoch the trial reports its
validation mIoU (step = the fold's position x epochs + epoch); the pruner (median by default, Hyperband as an
option) stops it at that epoch boundary, its files written (``last.ckpt`` kept; Optuna records it as
pruned). A trial that fails (a config that does not build, a NaN loss) is recorded as failed with its
one-line reason, and the sweep goes on.

The study lives in a storage any number of ``competition sweep`` processes share (on one machine or many):
a SQLite file beside the runs by default, any SQLAlchemy URL (``postgresql://...``), or an Optuna journal
file (``journal:PATH``, for a shared disk). ``--trials`` counts the study's trials, not one worker's; a
worker killed mid-trial leaves it running in the storage, and after the heartbeat's grace period another
worker marks it failed and retries its parameters in a new trial.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.config import Config, ConfigError
from ..core.config_file import config_from_dict, load_config
from ..core.io import atomic_write_text
from ..data.splits import parse_folds
from .loop import train_fold
from .preflight import check_data
from .resume import record_folds

STUDY_DB = "study.db"  # the default storage: a SQLite file in the study's runs folder
HEARTBEAT_S, GRACE_S = 60, 180  # a running trial's heartbeat; after the grace period it counts as dead


@dataclass
class Param:
    """One searched key: ``values`` (categorical) or ``low`` / ``high`` (``log``, ``int``, ``step``), sampled
    only when ``when`` (key -> value) holds for the trial's config."""

    key: str
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = False
    step: float | None = None
    when: dict[str, Any] = field(default_factory=dict)

    def candidates(self) -> list[Any]:
        """Values that must all validate: every categorical value, or both ends of the range."""
        if self.values is not None:
            return list(self.values)
        return [int(self.low), int(self.high)] if self.int else [self.low, self.high]


def read_space(path: str | os.PathLike) -> list[Param]:
    """The search space of a YAML file (module docstring), each entry checked for its form."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read search space {path}: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: a search space maps dotted config keys to values or ranges")
    params = []
    for key, spec in raw.items():
        if isinstance(spec, list):
            spec = {"values": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: {key}: give a list of values or {{low, high}}, got {spec!r}")
        unknown = sorted(set(spec) - set(Param.__dataclass_fields__) - {"key"})
        if unknown or ("values" in spec) == ("low" in spec or "high" in spec):
            raise ConfigError(
                f"{path}: {key}: give either values: [...] or low / high (with log, int, step, when); "
                f"got {sorted(spec)}"
            )
        params.append(Param(key=str(key), **spec))
    return params


def check_space(base: Config, params: list[Param]) -> None:
    """Every value of every key, set on the base config, makes a valid config (``when`` keys too): a typo or
    a key of another architecture fails here, with the config's did-you-mean, before any trial runs."""
    raw = base.model_dump(mode="json")
    for param in params:
        condition = [_override(k, v) for k, v in param.when.items()]
        for value in param.candidates():
            try:
                config_from_dict(raw, [*condition, _override(param.key, value)], source="the search space")
            except ConfigError as exc:
                raise ConfigError(f"search space: {param.key}={value!r}: {exc}") from None


def _override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def sample(trial: Any, params: list[Param], base: Config) -> list[str]:
    """The overrides of one trial: each parameter whose ``when`` holds (on the base config as the earlier
    samples change it), suggested by the trial's sampler."""
    chosen: dict[str, Any] = {}
    flat = _flat(base.model_dump(mode="json"))
    for param in params:
        if any(chosen.get(k, flat.get(k)) != v for k, v in param.when.items()):
            continue
        if param.values is not None:  # Optuna's choices are scalars: a list value goes as its YAML text
            choices = {_override("", v).removeprefix("=") if isinstance(v, (list, dict)) else v: v
                       for v in param.values}  # fmt: skip
            value = choices[trial.suggest_categorical(param.key, list(choices))]
        elif param.int:
            value = trial.suggest_int(param.key, int(param.low), int(param.high), step=int(param.step or 1),
                                      log=param.log)  # fmt: skip
        else:
            value = trial.suggest_float(param.key, param.low, param.high, step=param.step, log=param.log)
        chosen[param.key] = value
    return [_override(k, v) for k, v in chosen.items()]


def _flat(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def storage_of(url: str | None, runs: Path, study: str) -> Any:
    """The study's storage: a SQLite file beside the runs (default), any SQLAlchemy URL, or
    ``journal:PATH`` (Optuna's journal file). RDB storages keep a heartbeat, so a dead worker's trial is
    retried."""
    optuna = optuna_module()
    import sqlalchemy.exc
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if url and url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    if not url:
        (runs / study).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(runs / study / STUDY_DB).resolve()}"
    # SQLite: wait for another worker's lock instead of failing after sqlite's 5 s
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    for attempt in range(6):  # workers started together race to create the tables of a new storage
        try:
            with warnings.catch_warnings():  # Optuna marks the heartbeat experimental (stable since v2.8)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )  # fmt: skip
        except sqlalchemy.exc.SQLAlchemyError:  # a bad URL or a missing driver fails at once
            if attempt == 5:
                raise
            time.sleep(0.5 * (attempt + 1))


def load_study(name: str, storage: str | None = None, runs: str | Path = "runs") -> Any:
    """The study ``name`` from ``storage`` (default: the sweep's SQLite file ``runs/<name>/study.db``)."""
    optuna = optuna_module()
    if not storage:
        path = Path(runs) / name / STUDY_DB
        if not path.is_file():
            raise ConfigError(f"no study {name!r} at {path} (the sweep's default storage): pass --storage "
                              "URL as given to competition sweep")  # fmt: skip
    store = storage_of(storage, Path(runs), name)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(store))
        raise ConfigError(f"no study {name!r} in {storage or path}; it holds {names or 'no study'}") from None


def optuna_module() -> Any:
    """Optuna; an ``ImportError`` saying how to install it when it is missing."""
    try:
        import optuna
    except ImportError as exc:
        raise ImportError('competition sweep needs optuna: pip install "smp-unet3p[sweep]"') from exc
    return optuna


def pruner_of(name: str) -> Any:
    optuna = optuna_module()

    pruners = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    if name not in pruners:
        raise ConfigError(f"--pruner {name!r}: choose one of {sorted(pruners)}")
    return pruners[name]()


def sweep(
    config: str | os.PathLike,
    space: str | os.PathLike,
    study: str,
    trials: int = 20,
    timeout: float | None = None,
    storage: str | None = None,
    fold: str = "0",
    pruner: Any = "median",
    sampler: Any = None,
    overrides: list[str] | None = None,
) -> Any:
    """Run (or join) the search ``study`` until it has ``trials`` trials or ``timeout`` seconds pass; returns
    the Optuna study. ``fold``: the folds each trial trains (``all``, ``0``, ``0,2``)."""
    optuna = optuna_module()
    from optuna.study import MaxTrialsCallback

    base = load_config(config, overrides)
    params = read_space(space)
    check_space(base, params)
    check_data(base)  # a wrong data root fails here, not in every trial (a trial's model is its own check)
    runs = base.output_dir / study
    folds = parse_folds(fold, base.data.folds)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says what happened
    found = optuna.create_study(
        study_name=study, storage=storage_of(storage, base.output_dir, study), direction="maximize",
        load_if_exists=True, sampler=sampler, pruner=pruner_of(pruner) if isinstance(pruner, str) else pruner,
    )  # fmt: skip

    def objective(trial: Any) -> float:
        run_dir = Path(trial.user_attrs.get("resume_from") or runs / f"trial_{trial.number}")
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            return _train_trial(trial, base, params, run_dir, folds)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Ctrl-C: the next worker resumes this run (_retry_interrupted)
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as exc:  # recorded as failed with its reason; the sweep goes on
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            trial.set_user_attr("reason", f"{type(exc).__name__}: {reason}")
            print(f"trial {trial.number}: failed: {reason}", flush=True)
            raise

    _retry_interrupted(found)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    found.optimize(
        objective, n_trials=trials, timeout=timeout, catch=(Exception,),
        callbacks=[MaxTrialsCallback(trials, states=states)],
    )  # fmt: skip
    return found


def _retry_interrupted(study: Any) -> None:
    """Queue again, once, the parameters of every trial stopped by Ctrl-C, as a trial that resumes its run."""
    for old in study.trials:
        mark = f"retried_{old.number}"
        if old.state.name == "FAIL" and old.user_attrs.get("interrupted") and not study.user_attrs.get(mark):
            study.set_user_attr(mark, True)
            study.enqueue_trial(old.params, user_attrs={"resume_from": old.user_attrs["run_dir"]})
            print(f"trial {old.number} was interrupted: queued again, resuming {old.user_attrs['run_dir']}")


def _train_trial(trial: Any, base: Config, params: list[Param], run_dir: Path, folds: list[int]) -> float:
    """Train one trial's run (``run_dir``: a resumed trial's is the interrupted one's) fold by fold, reporting
    each epoch's mIoU; its score is the mean of the folds' best validation mIoU."""
    optuna = optuna_module()

    raw = base.model_dump(mode="json") | {"output_dir": str(run_dir.parent), "name": run_dir.name}
    resume = "resume_from" in trial.user_attrs
    overrides = sample(trial, params, base)
    trial.set_user_attr("overrides", overrides)
    cfg = config_from_dict(raw, overrides, source=f"trial {trial.number}")
    record_folds(cfg, folds)
    best = []
    for position, k in enumerate(folds):
        offset = position * cfg.train.epochs

        def report(epoch: int, row: dict[str, Any], offset: int = offset, k: int = k) -> None:
            miou = row["miou"]
            trial.report(miou if math.isfinite(miou) else 0.0, offset + epoch)
            if trial.should_prune():  # the epoch's files are written: the run stops at its boundary
                where = f"after epoch {epoch + 1} of fold {k}"
                trial.set_user_attr("pruned", where)  # the report's trial table shows it
                print(f"trial {trial.number}: pruned {where}", flush=True)
                raise optuna.TrialPruned(f"pruned {where}")

        best.append(train_fold(cfg, k, resume=resume, on_epoch_end=report).best_miou)
    score = sum(best) / len(best)
    print(f"trial {trial.number}: mIoU {score:.4f} with {overrides}", flush=True)
    return score


def best_config(study: str, out: str | os.PathLike, storage: str | None = None, runs: str = "runs") -> Path:
    """Write the best trial's full config (its run's ``config.yaml``, named ``<study>_best`` under the
    study's own output folder) to ``out``: ``competition train --config out`` trains it again."""
    optuna = optuna_module()

    found = load_study(study, storage, runs)
    completed = [t for t in found.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise ConfigError(f"study {study!r} has no completed trial yet ({len(found.trials)} in all)")
    run = Path(found.best_trial.user_attrs["run_dir"])
    config = next(iter(sorted(run.glob("fold*/config.yaml"))), None)
    if config is None:
        raise ConfigError(f"{run} (the best trial's run) holds no fold<k>/config.yaml")
    raw = yaml.safe_load(config.read_text())
    raw |= {"name": f"{study}_best", "output_dir": str(run.parent.parent)}
    return atomic_write_text(out, yaml.safe_dump(raw, sort_keys=False))
