"""``weights.json`` as read: ensemble weights chosen by ``evaluate --search-weights --save-weights`` for runs
named in it, matched to what they weigh (run folders, or probability files by the run that made each) by run
name and config hash, and checked to be finite numbers >= 0 that do not sum to 0."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.runtime import check_weights
from . import provenance
from .provenance import ProvenanceError


def weights_for_runs(path: str | os.PathLike, runs: Sequence[str | os.PathLike]) -> np.ndarray:
    """The weights of ``weights.json`` in the order of the run directories ``runs``, matched by name."""
    infos = [provenance.read_run(r) for r in runs]
    return weights_in_order(path, [(str(i.dir), i.record()) for i in infos], infos[0].class_names)


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """``weights.json`` as written by ``evaluate --save-weights``; another file (a ``postprocess.json``, a
    bundle's manifest) or a broken one is refused in one line naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ProvenanceError(f"cannot read weights file {path}: {exc}") from None
    missing = [k for k in ("runs", "class_names", "weights") if not isinstance(data, dict) or k not in data]
    if missing:
        kind = (data.get(provenance.KEY) or {}).get("kind") if isinstance(data, dict) else None
        looks = f" (it is a {kind} file)" if kind else ""
        raise ProvenanceError(
            f"{path} is not a weights.json{looks}: it has no {missing}. Give the file written by "
            "`competition evaluate --search-weights --save-weights FILE`"
            + (", and a postprocess.json to --postprocess" if kind == "postprocess" else "")
        )
    return data


def weights_in_order(
    path: str | os.PathLike, members: Sequence[tuple[str, dict[str, Any]]], class_names: Sequence[str] | None
) -> np.ndarray:
    """Rows of ``weights.json`` for ``members`` (``(what, run record)``): a member of a run the weights were
    not chosen for, a run without a member, two members of one run, or a member of a run with the same name
    but another config is an error naming both sides."""
    data = read_weights_file(path)
    if class_names is not None and data["class_names"] != list(class_names):
        raise ProvenanceError(
            f"{path} holds weights for classes {data['class_names']}, {members[0][0]} has {list(class_names)}"
        )
    weights = check_weights(data["weights"], str(path))
    chosen = data.get(provenance.KEY, {}).get("runs") or [{"name": Path(r).name} for r in data["runs"]]
    if len(weights) != len(chosen):
        raise ProvenanceError(f"{path} holds {len(weights)} weight rows for {len(chosen)} runs")
    index = {r["name"]: k for k, r in enumerate(chosen)}
    order = []
    for what, run in members:
        name = run["name"]
        if name not in index:
            raise ProvenanceError(
                f"{what} comes from run {name!r}; {path} has weights for runs {list(index)}"
            )
        want, have = chosen[index[name]].get("config_hash"), run.get("config_hash")
        if want and have and want != have:
            raise ProvenanceError(
                f"{what} comes from run {name!r} with config {have}, but {path} chose weights for run "
                f"{name!r} with config {want}: another run of the same name"
            )
        if index[name] in order:
            raise ProvenanceError(f"two inputs come from run {name!r}")
        order.append(index[name])
    unused = [r["name"] for k, r in enumerate(chosen) if k not in order]
    if unused:
        raise ProvenanceError(
            f"{path} chose weights for runs {[r['name'] for r in chosen]} together; nothing given of {unused}"
        )
    return weights[order]
