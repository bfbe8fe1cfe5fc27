"""A sweep's study read back for ``competition report --study``: every trial (state, score, epochs reported,
parameters, why it failed or where it was pruned), the search's history, each trial's per-epoch curve as the
pruner saw it, and the parameters' importance (Optuna's fANOVA over the completed trials)."""

from __future__ import annotations

import html
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.html import note, png, pyplot, table
from .sweep import load_study, optuna_module

MIN_FOR_IMPORTANCE = 3  # completed trials with at least two values of a parameter


def trial_frame(study: Any) -> pd.DataFrame:
    """One row per trial: number, state, score, epochs reported, seconds, each parameter, and a note (the
    failure's reason, the epoch a pruned trial stopped at, a resumed run)."""
    rows = []
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        attrs = t.user_attrs
        stopped = "interrupted (Ctrl-C)" if attrs.get("interrupted") else ""
        why = attrs.get("reason") or attrs.get("pruned") or stopped
        if attrs.get("resume_from"):
            why = f"resumed {Path(attrs['resume_from']).name}" + (f"; {why}" if why else "")
        rows.append({"trial": t.number, "state": t.state.name.lower(), "mIoU": t.value,
                     "epochs": len(t.intermediate_values), "seconds": seconds and round(seconds, 1),
                     **{k: f"{v:.3g}" if isinstance(v, float) else v for k, v in t.params.items()},
                     "note": why, "run": Path(attrs.get("run_dir", "")).name})  # fmt: skip
    return pd.DataFrame(rows)


def state_counts(study: Any) -> dict[str, int]:
    """Trials per state (``complete``, ``pruned``, ``fail``, ``running``, ``waiting``), zeros included."""
    counts = dict.fromkeys(("complete", "pruned", "fail", "running", "waiting"), 0)
    for t in study.trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def importances(study: Any) -> dict[str, float]:
    """Each parameter's share of the completed trials' score variance (fANOVA, seeded); empty when fewer than
    ``MIN_FOR_IMPORTANCE`` trials completed or no parameter varied."""
    optuna = optuna_module()
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < MIN_FOR_IMPORTANCE:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
        except (RuntimeError, ValueError):  # no parameter common to the trials, or none that varies
            return {}
    return {k: float(v) for k, v in found.items()}


def history_figure(study: Any) -> str:
    """Left: each trial's score by trial number (pruned trials at their last reported mIoU) and the best so
    far. Right: the mIoU every trial reported epoch by epoch, as the pruner compared them."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6))
    best, best_line = -math.inf, []
    for t in study.trials:
        state = t.state.name
        curve = sorted(t.intermediate_values.items())
        if state == "COMPLETE":
            left.scatter(t.number, t.value, color="tab:blue", zorder=3)
            best = max(best, t.value)
        elif state == "PRUNED" and curve:
            left.scatter(t.number, curve[-1][1], color="tab:red", marker="x", zorder=3)
        best_line.append((t.number, best if best > -math.inf else math.nan))
        if curve:
            style = {"COMPLETE": ("tab:blue", "-"), "PRUNED": ("tab:red", "--")}.get(state, ("grey", ":"))
            right.plot([s + 1 for s, _ in curve], [v for _, v in curve], color=style[0], ls=style[1],
                       marker=".", alpha=0.7)  # fmt: skip
    if best_line:
        left.step(*zip(*best_line), where="post", color="black", label="best so far")
        left.legend(fontsize=8)
    left.set_title("score by trial (blue: complete, red x: pruned)")
    left.set_xlabel("trial")
    right.set_title("validation mIoU reported per epoch (red dashed: pruned)")
    right.set_xlabel("epoch (folds one after another)")
    for ax in (left, right):
        ax.set_ylabel("mIoU")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def importance_figure(found: dict[str, float]) -> str:
    plt = pyplot()
    names = list(found)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * len(names)))
    ax.barh(names, [found[n] for n in names], color="tab:blue")
    ax.set_xlabel("share of the score's variance (fANOVA over completed trials)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    return png(fig)


def study_section(name: str, storage: str | None = None, runs: str | Path = "runs") -> list[str]:
    """The HTML parts of the study ``name``: counts, best trial, history, importance and the trial table."""
    optuna = optuna_module()
    study = load_study(name, storage, runs)
    counts = state_counts(study)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    counted = f"{len(study.trials)} trials: {summary or 'none yet'}"
    parts = [
        f"<h2>Sweep {html.escape(name)}: trials</h2>",
        f'<p id="study-counts">{html.escape(counted)}</p>',
    ]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
        best = study.best_trial
        overrides = " ".join(best.user_attrs.get("overrides", []))
        parts.append(f"<p>best trial {best.number}: mIoU {best.value:.4f} "
                     f"(run {html.escape(best.user_attrs.get('run_dir', '?'))}): "
                     f"<code>{html.escape(overrides)}</code></p>")  # fmt: skip
    if study.trials:
        parts += ["<h2>Sweep history</h2>", history_figure(study)]
    found = importances(study)
    parts.append("<h2>Parameter importance</h2>")
    if found:
        parts += [table(pd.DataFrame({"parameter": list(found), "importance": list(found.values())})),
                  importance_figure(found)]  # fmt: skip
    else:
        parts.append(note(f"needs {MIN_FOR_IMPORTANCE} completed trials in which a parameter varies "
                          f"({len(done)} completed)"))  # fmt: skip
    parts += ["<h2>Every trial</h2>", table(trial_frame(study))]
    return parts
