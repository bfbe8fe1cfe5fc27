"""Experiment trackers, read back with each tool's own reader: TensorBoard's event accumulator, MlflowClient
on the local store, and W&B's offline run file (its records parsed with W&B's own protobuf schema)."""

import json
import struct

import pandas as pd
import pytest

from competition.core import config as config_module
from competition.core.config import ConfigError
from competition.core.config_file import config_from_dict
from competition.train.loop import train
from tests.conftest import tiny_config_dict


def wandb_records(path):
    """W&B's ``.wandb`` run file: a LevelDB-style log (7-byte file header; 32 KiB blocks of records with a
    crc32/length/type header) whose records are ``wandb_internal_pb2.Record`` messages. wandb 0.31 reads it
    in its Go core only, so the framing is read here and each record is parsed by wandb's protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def key(item):
    """A history / config / summary item's name (W&B puts some names in ``nested_key``)."""
    return item.key or "/".join(item.nested_key)


def test_missing_tracker_package_fails_at_config_load_with_the_extra_to_install(synthetic_data, tmp_path):
    raw = tiny_config_dict(synthetic_data, tmp_path)
    original = config_module.importlib.util.find_spec
    config_module.importlib.util.find_spec = lambda name: None if name == "wandb" else original(name)
    try:
        with pytest.raises(
            ConfigError, match=r"override train.loggers=\[csv,wandb\]: logger 'wandb' needs wandb: pip"
        ):
            config_from_dict(raw, ["train.loggers=[csv,wandb]"])
        assert config_from_dict(raw, ["train.loggers=[csv,csv]"]).train.loggers == ["csv"]
    finally:
        config_module.importlib.util.find_spec = original
    with pytest.raises(ConfigError, match="train.loggers"):
        config_from_dict(raw, ["train.loggers=[comet]"])


def test_trackers_log_config_epochs_per_class_iou_and_artifacts(synthetic_data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    raw = tiny_config_dict(synthetic_data, tmp_path / "runs", epochs=2)
    cfg = config_from_dict(raw, ["train.loggers=[csv,tensorboard,mlflow,wandb]", "train.checkpoint_every=1"])
    train(cfg, "0")
    run_dir = cfg.run_dir(0)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    present = [c for c in metrics.columns if c.startswith("iou_") and metrics[c].notna().all()]
    assert present

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("miou")] == [1, 2]
    assert [e.value for e in events.Scalars("miou")] == pytest.approx(metrics["miou"].tolist())
    assert [e.value for e in events.Scalars(f"iou/{present[0][4:]}")] == pytest.approx(
        metrics[present[0]].tolist()
    )
    text = {t: events.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in events.Tags()["tensors"]}
    assert "arch: unet3plus" in text["config/text_summary"]
    assert str((run_dir / "curves.png").resolve()) in text["artifacts/text_summary"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'mlflow.db'}")
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.run_name == "fold0" and run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "unet3plus" and run.data.params["train.epochs"] == "2"
    history = client.get_metric_history(run_id, "miou")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx(metrics["miou"].tolist())
    assert run.data.tags["best_weights"] == str((run_dir / "best.safetensors").resolve())
    assert {"curves.png", "best.json"} <= {a.path for a in client.list_artifacts(run_id)}

    [wandb_file] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    records = list(wandb_records(wandb_file))
    history = [
        {key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")
    ]
    assert [h["miou"] for h in history] == pytest.approx(metrics["miou"].tolist())
    assert [h["_step"] for h in history] == [1, 2] and f"iou/{present[0][4:]}" in history[0]
    [run_record] = [r.run for r in records if r.HasField("run")]
    config = {key(i): json.loads(i.value_json) for i in run_record.config.update}
    assert config["model"]["arch"] == "unet3plus" and config["train"]["epochs"] == 2
    summary = {key(i): i.value_json for r in records if r.HasField("summary") for i in r.summary.update}
    assert json.loads(summary["best_weights"]) == str((run_dir / "best.safetensors").resolve())

    # resuming continues the same tracked runs
    changed = config_from_dict(raw, ["train.loggers=[csv,mlflow]", "optimizer.lr=0.5"])
    with pytest.raises(ConfigError):  # a changed optimizer is refused ...
        train(changed, "0", resume=True)
    longer = config_from_dict(
        raw, ["train.loggers=[csv,tensorboard,mlflow,wandb]", "train.epochs=3", "train.checkpoint_every=1"]
    )
    train(longer, "0", resume=True)  # ... more epochs extend the run, into the same tracked runs
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"] == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    tags = client.get_run(run_id).data.tags
    assert tags["changed_on_resume.train.epochs"] == "2 -> 3"
    assert [m.step for m in client.get_metric_history(run_id, "miou")] == [1, 2, 3]
