"""The ``ensemble`` stage: saved probability files (``predict --save-probs``) voted into a validated
submission. Files are joined to the test json by image file name (``predictions.oof.join_images``), weighted
by ``--weights`` or by a ``weights.json`` matched to each file by the run that made it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.checkpoint import CheckpointError
from ..predictions import provenance
from ..predictions.oof import check_same_classes, join_images, stored_class_names, stored_images
from ..predictions.provenance import ProvenanceError
from ..predictions.weights_file import weights_in_order


@dataclass
class ProbFiles:
    """``predict --save-probs`` files opened together (``read_prob_files``), joined by image file name."""

    paths: list[Path]
    files: list[Any]
    class_names: list[str]
    blocks: list[dict[str, Any] | None]  # each file's provenance (None: written before provenance)
    keys: list[list[str]] | None = None  # per file, the key of each wanted image (read_prob_files' order)

    def iterate(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, list[np.ndarray]]]:
        """``(key, [probabilities of each file])`` per wanted image, in ``read_prob_files``' order (``keys``:
        the same key in every file, for files made together); the key is the first file's."""
        rows = zip(*self.keys) if keys is None else ([k] * len(self.files) for k in keys)
        for row in rows:
            probs = [f[f"pred__{k}"] for f, k in zip(self.files, row)]
            if len({p.shape for p in probs}) > 1:
                raise CheckpointError(
                    f"probability maps of {row[0]} differ in shape: {[p.shape for p in probs]}"
                )
            yield row[0], probs

    def background(self) -> int | None:
        """The background class id of the runs the files were made from (``None``: none; files written
        before it was recorded: 0); files that differ are refused, as for runs."""
        return provenance.agreed_background(
            {f"{r['name']} of {p}": provenance.record_background(r)
             for p, b in zip(self.paths, self.blocks) for r in (b or {}).get("runs", [])}
        )  # fmt: skip

    def partial(self) -> list[str]:
        """The incomplete-run problems the files were made with (``predict --allow-partial``)."""
        return [f"{p}: {x}" for p, b in zip(self.paths, self.blocks) for x in (b or {}).get("partial", [])]


def read_prob_files(
    paths: Sequence[str | os.PathLike], images: Sequence[tuple[str, tuple[int, int] | None]], what: str
) -> ProbFiles:
    """Open ``predict --save-probs`` files: their common class names are checked, and every wanted image
    (``(file name, (height, width))``, from ``what``, e.g. the test json) must be in every file at that size,
    found by its file name (``oof.join_images``), before anything is read."""
    files = [np.load(p) for p in paths]
    names = check_same_classes([(str(p), stored_class_names(f, p)) for p, f in zip(paths, files)])
    keys = [join_images(images, stored_images(f, p), p, what) for p, f in zip(paths, files)]
    return ProbFiles([Path(p) for p in paths], files, names, [provenance.from_npz(f) for f in files], keys)


def load_weights(path: str | os.PathLike, probs: ProbFiles) -> np.ndarray:
    """The weights of ``weights.json`` (``save_weights``) in the order of the probability files, matched by
    the run that made each file (its provenance), in any order (``_weights_in_order``)."""
    members = []
    for file, block in zip(probs.paths, probs.blocks):
        if len(provenance.run_names(block)) != 1:
            raise ProvenanceError(
                f"{file} was made by {provenance.describe(block)}: weights.json weighs single runs, so each "
                "probability file must come from one run (predict --runs RUN --save-probs FILE)"
            )
        members.append((str(file), block["runs"][0]))
    return weights_in_order(path, members, probs.class_names)


def ensemble_probs(
    paths: Sequence[str | os.PathLike],
    test_json: str | os.PathLike,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    weights_file: str | os.PathLike | None = None,
    vote: str = "soft",
    fmt: str = "boostcamp",
    size: int | None = 256,
    postprocess: str | os.PathLike | None = None,
    overwrite: bool = False,
    allow_partial: bool = False,
) -> Path:
    """Vote saved probability files (``predict --save-probs``) into a validated submission, with its
    provenance beside it. ``weights_file`` (``weights.json``) is matched to the files by run name;
    ``size=None`` writes each mask at its image's size from ``test_json``. Files made from unfinished runs
    (``predict --allow-partial``) are refused unless ``allow_partial``."""
    from ..data.coco import load_coco
    from ..predictions.postprocess import PostProcess
    from ..predictions.submission import submission_rows, write_submission
    from ..predictions.voting import vote_mask

    coco = load_coco(test_json, None)
    images = [(info.file_name, (info.height, info.width)) for info in coco.images.values()]
    files = read_prob_files(paths, images, str(test_json))
    what = "probability files made from incomplete runs"
    partial = provenance.accept_partial(files.partial(), allow_partial, what, "Make them from finished runs")
    if weights_file is not None:
        weights = load_weights(weights_file, files)
    background = files.background()
    post = PostProcess.load(postprocess, files.class_names, background) if postprocess else None
    if post is not None and post.crf is not None:
        raise ValueError(
            f"{postprocess} sets a dense CRF, which needs the images: apply it with predict --postprocess"
        )
    rows = []
    for (_, probs), info in zip(files.iterate(), coco.images.values()):
        mask = vote_mask(probs, weights, vote, size or (info.height, info.width))
        rows += submission_rows(info.file_name, post(mask) if post else mask, fmt, size, background)
    expected = [info.file_name for info in coco.images.values()]
    shapes = {info.file_name: (info.height, info.width) for info in coco.images.values()}
    path = write_submission(
        rows, out, expected, len(files.class_names), fmt, size, overwrite, shapes, background
    )
    block = {
        "kind": "submission",
        "made_from": [{"file": str(p), "provenance": b} for p, b in zip(files.paths, files.blocks)],
        "class_names": files.class_names,
        "vote": vote,
        "weights": None if weights is None else np.asarray(weights).tolist(),
        "weights_file": str(weights_file) if weights_file else None,
        "format": fmt,
        "size": size,
        "postprocess": str(postprocess) if postprocess else None,
        "partial": partial,
    }
    provenance.write_sidecar(path, block)
    return path
