"""The ``predict`` stage: the fold/run ensemble (``predictor``) on a test set -> submission CSV, saved
probabilities and overlay PNGs."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.runtime import stage_threads
from ..predictions import provenance
from .predictor import Ensemble, InferenceOptions, image_loader, iterate_predictions, load_runs


def predict(
    runs: Sequence[str | os.PathLike],
    data_root: str | os.PathLike,
    test_json: str | os.PathLike,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    opts: InferenceOptions | None = None,
    fmt: str = "boostcamp",
    size: int | None = 256,
    save_probs: str | os.PathLike | None = None,
    probs_size: int | None = 256,
    overlays: int = 4,
    batch_size: int = 4,
    workers: int = 2,
    device: Any = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    postprocess: str | os.PathLike | None = None,
    allow_partial: bool = False,
    engine: str = "torch",
) -> dict[str, Any]:
    """Predict every image of ``test_json`` (a COCO json, or a folder: every image under it) with the
    weighted ensemble of every fold of ``runs`` (+ TTA) and write the submission (validated, atomic) with its
    provenance beside it (``submission.provenance.json``);
    optionally the probabilities (``save_probs``, float16 at ``probs_size``, 0 / ``None``: native) for later
    multi-run ensembling, and overlay PNGs of the first ``overlays`` images. ``size=None``: native-size
    masks. ``postprocess``: a ``postprocess.json`` (tuned on OOF) applied to each submission mask.
    ``engine``: ``torch``, or ``onnxruntime`` (each fold's ``model.onnx``, in a bundle made with ``--onnx``).
    Runs whose folds did not all finish are refused unless ``allow_partial`` (the provenance records it).
    """
    from ..core.io import NpzStreamWriter, check_writable
    from ..data.coco import folder_index, load_coco, safe_join
    from ..data.datasets import TestImageDataset, read_image
    from ..data.images import check_images
    from ..data.panels import save_panels
    from ..predictions.postprocess import PostProcess
    from ..predictions.submission import mask_from_probs, resize_probs, submission_rows, write_submission

    started = time.perf_counter()
    opts = opts or InferenceOptions()
    check_writable(out, overwrite)
    if save_probs:
        check_writable(save_probs, overwrite)
    if Path(test_json).is_dir():  # --images DIR: indexing it reads every image already
        coco = folder_index(test_json)
    else:
        coco = load_coco(test_json, data_root)
        image_names = [info.file_name for info in coco.images.values()]
        check_images(data_root, image_names, str(test_json), "--data-root")  # before any model loads
    loaded = load_runs(runs, weights, device, allow_partial, engine)
    specs, names = loaded.specs, loaded.names
    post = PostProcess.load(postprocess, names, loaded.background) if postprocess else None
    settings = {
        "weights": loaded.weights,
        "tta": opts.views,
        "scales": opts.scales,
        "tile": opts.tile,
        "partial": loaded.partial,
    }
    threads = stage_threads(workers)
    views = len(opts.views) * len(opts.scales)
    print(f"predict: {len(coco.images)} images x {len(specs)} models x {views} views on {device}, {threads} "
          f"threads, {workers} workers", flush=True)  # fmt: skip
    for spec in specs:
        if opts.channels_last:
            spec.model.to(memory_format=torch.channels_last)
    ensemble = Ensemble(specs, opts)
    dataset = TestImageDataset(data_root, coco)
    loader = image_loader(
        dataset, {(i.height, i.width) for i in coco.images.values()}, batch_size, workers, device
    )
    rows: list[list] = []
    overlay_dir = Path(out).parent / f"{Path(out).stem}_overlays"
    written: list[Path] = []
    probs_writer = NpzStreamWriter(save_probs, overwrite) if save_probs else contextlib.nullcontext()
    with probs_writer as writer:
        bar = tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress)
        for image_id, file_name, probs in iterate_predictions(ensemble, loader, device):
            probs = probs.half().float()  # the precision of saved probabilities: ensemble of them agrees
            refined, image = probs, None
            if post is not None and post.crf is not None:
                image = read_image(safe_join(data_root, file_name))
                refined = torch.from_numpy(post.refine(probs.numpy(), image))
            mask = mask_from_probs(refined, size)
            rows += submission_rows(file_name, post(mask) if post else mask, fmt, size, loaded.background)
            if writer is not None:
                writer.put(f"pred__{image_id}", resize_probs(probs, probs_size).half().numpy())
            if len(written) < overlays:
                target = overlay_dir / f"{Path(file_name).with_suffix('').as_posix().replace('/', '_')}.png"
                image = read_image(safe_join(data_root, file_name)) if image is None else image
                panels = [("prediction", mask_from_probs(probs, None))]
                shown = save_panels(target, image, panels, names, file_name, background=loaded.background)
                written.append(shown)
            bar.update()
        bar.close()
        if writer is not None:
            writer.put("image_ids", np.array([str(i) for i in coco.images]))
            writer.put("file_names", np.array([info.file_name for info in coco.images.values()]))
            sizes = [(info.height, info.width) for info in coco.images.values()]
            writer.put("sizes", np.array(sizes, dtype=np.int64).reshape(-1, 2))
            writer.put("class_names", np.array(names))
            block = provenance.record("probs", loaded.infos, names, size=probs_size, **settings)
            writer.put(provenance.KEY, provenance.to_npz(block))
    expected = [info.file_name for info in coco.images.values()]
    shapes = {info.file_name: (info.height, info.width) for info in coco.images.values()}
    path = write_submission(rows, out, expected, len(names), fmt, size, overwrite, shapes, loaded.background)
    block = {"format": fmt, "size": size, **settings}
    block["postprocess"] = str(postprocess) if postprocess else None
    provenance.write_sidecar(path, provenance.record("submission", loaded.infos, names, **block))
    return {
        "submission": path,
        "images": len(dataset),
        "models": len(specs),
        "views": len(opts.views) * len(opts.scales),
        "seconds": time.perf_counter() - started,
        "overlays": written,
        "probs": Path(save_probs) if save_probs else None,
        "classes": names,
    }
