import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# nothing may download at test time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]  # the repository root (tests/ mirrors its packages)
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def tiny_config_dict(data: dict, out: Path, **train) -> dict:
    """A seconds-on-CPU UNet 3+ (DS + soft CGM) config for the synthetic dataset."""
    return {
        "name": "tiny",
        "output_dir": str(out),
        "data": {"root": str(data["root"]), "annotations": str(data["train"]), "folds": str(data["folds"])},
        "model": {
            "arch": "unet3plus",
            "encoder_name": "resnet18",
            "encoder_weights": None,
            "params": {"deep_supervision": True, "cgm": True, "cgm_gate": "soft", "decoder_cat_channels": 8},
        },
        "loss": {"name": "dice_ce"},
        "optimizer": {"lr": 3e-3},
        "augment": {"hflip": 0.5},
        "train": {"epochs": 2, "batch_size": 4, "workers": 0, "progress": False, **train},
    }


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict:
    """12 training + 4 test images (64 px) of the synthetic trash dataset, with 2 folds."""
    from competition.data.classes import ClassMap
    from competition.data.coco import load_coco
    from competition.data.folds import build_folds, write_folds
    from competition.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    paths = make_synthetic_dataset(root, n_train=12, n_test=4, size=64, seed=1)
    coco = load_coco(paths["train"], root)
    write_folds(build_folds(coco, ClassMap.build(coco.categories), 2, seed=0), root / "folds.csv")
    return {**paths, "folds": root / "folds.csv"}


@pytest.fixture(scope="session")
def trained_run(synthetic_data, tmp_path_factory):
    """Both folds of the tiny config, trained 2 epochs (shared by the training and inference tests)."""
    from competition.core.config_file import config_from_dict
    from competition.train.loop import train

    cfg = config_from_dict(tiny_config_dict(synthetic_data, tmp_path_factory.mktemp("runs")))
    results = train(cfg, "all")
    return cfg, results


def fake_oof_run(root, name, folds, classes, ignore_index=255, file_names=None, dtype="uint8"):
    """A finished run directory whose folds hold ``config.yaml`` (1 epoch), ``metrics.csv``, ``best.json`` and
    ``oof.npz`` built from given maps (no weights); image ``id`` is the file ``file_names[id]`` (default
    ``<id>.png``)."""
    from competition.core.config_file import config_from_dict
    from competition.predictions.oof import OofWriter

    data = {"root": str(root), "annotations": str(root / "train.json"), "folds": str(root / "folds.csv")}
    cfg = config_from_dict({"name": name, "data": data, "train": {"epochs": 1}})
    for fold, items in folds.items():
        d = root / name / f"fold{fold}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(cfg.to_yaml())
        (d / "metrics.csv").write_text("epoch,miou\n1,0.5\n")
        (d / "best.json").write_text(json.dumps({"fold": fold, "classes": classes}))
        with OofWriter(d / "oof.npz", "probs", None, classes, fold, ignore_index, dtype=dtype) as writer:
            for image_id, (probs, target) in items.items():
                file_name = (file_names or {}).get(image_id, f"{image_id}.png")
                batch = {"image_id": [image_id], "file_name": [file_name]}
                batch["mask"] = torch.as_tensor(target)[None]
                writer.add(batch, torch.as_tensor(probs, dtype=torch.float32)[None])
    return root / name


def onehot(labels, classes, confidence=1.0):
    labels = np.asarray(labels)
    probs = np.full((classes, *labels.shape), (1 - confidence) / (classes - 1), np.float32)
    for c in range(classes):
        probs[c][labels == c] = confidence
    return probs


def readme_command_lines(section: str | None = None) -> list[str]:
    """The README's ``competition ...`` lines (continuations joined, comments dropped); with ``section``,
    those of the first bash block after that heading only."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    if section is not None:
        text = text[text.index(section) :]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = []
    for block in blocks[:1] if section is not None else blocks:
        for line in block.replace("\\\n", " ").splitlines():
            start = line.find("competition ")
            if start >= 0:
                lines.append(re.sub(r"\s+#.*$", "", line[start:].split("&&")[0]).strip())
    return lines


def browser() -> str | None:
    """A headless-capable Chromium on PATH (``.ci/run`` installs Debian's), or None."""
    import shutil

    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--enable-logging=stderr"]  # fmt: skip


def chromium_dom(page: Path) -> str:
    """The DOM of ``page`` after load, as headless Chromium serialises it; fails on a script error."""
    import subprocess

    dom = subprocess.run([browser(), *BROWSER_FLAGS, "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Uncaught" not in dom.stderr  # no script error
    return dom.stdout
