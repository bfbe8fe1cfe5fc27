import copy
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from competition.core.config import ConfigError
from competition.core.config_file import apply_overrides, config_from_dict, load_config
from competition.core.metrics import ConfusionMatrix, argmax_classes, binary_scores, confusion
from competition.train.optim import lr_factor

BASE = {"name": "x", "data": {"root": "d", "annotations": "d/a.json", "folds": "d/f.csv"}}


def _raw(**sections):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    raw.update(sections)
    return raw


def test_shipped_configs_validate():
    for name in ("unet3plus_r34", "unet_effb0", "unetplusplus_effb0", "tiny_cpu", "camvid_lite0",
                 "camvid_lite0_sweep", "camvid_lite0_native"):  # fmt: skip
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.data.folds.is_absolute()  # resolved against the working directory


def test_overrides_are_typed_and_nested():
    cfg = config_from_dict(_raw(), ["train.epochs=3", "model.params.cgm=false", "optimizer.lr=1e-4"])
    assert cfg.train.epochs == 3 and cfg.model.params["cgm"] is False
    assert cfg.optimizer.lr == pytest.approx(1e-4)


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key\. Did you mean 'epochs'"):
        config_from_dict(_raw(train={"epocs": 3}))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=-2", "train.batch_size"),
        ("train.amp=fp8", "train.amp"),
        ("augment.hflip=1.5", "augment.hflip"),
        ("optimizer.lr=abc", "optimizer.lr"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(_raw(), [override])


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ConfigError, match=r"model\.arch.*Did you mean 'unet3plus'"):
        config_from_dict(_raw(), ["model.arch=unet3pls"])
    with pytest.raises(ConfigError, match=r"model\.encoder_name.*Did you mean 'resnet34'"):
        config_from_dict(_raw(), ["model.encoder_name=resnet43"])
    with pytest.raises(ConfigError, match=r"loss\.name.*Did you mean 'dice_ce'"):
        config_from_dict(_raw(), ["loss.name=dice-ce"])


def test_missing_data_paths_and_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"data\.annotations"):
        config_from_dict({"name": "x", "data": {"root": "d", "folds": "f.csv"}})
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_base_merges_sections_key_by_key_and_chains(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: tiny_cpu\nname: parent\ntrain: {epochs: 5}\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"  # a relative base is found from the file's own folder
    child.write_text(
        "base: ../parent.yaml\nname: child\nmodel: {params: {cgm: false}}\naugment: {size: [96, 64]}\n"
    )
    cfg = load_config(child)
    expected = load_config("tiny_cpu", ["name=child", "train.epochs=5", "model.params.cgm=false",
                                        "augment.size=[96,64]"])  # fmt: skip
    assert cfg == expected
    assert cfg.model.params["deep_supervision"] == load_config("tiny_cpu").model.params["deep_supervision"]
    # the shipped sweep recipe is camvid_lite0 plus its differences
    sweep, lite0 = load_config("camvid_lite0_sweep"), load_config("camvid_lite0")
    assert sweep.augment.scale == lite0.augment.scale and sweep.augment.size == (256, 320)
    native = load_config("camvid_lite0_native")
    assert native.augment.eval_size is None and (native.train.epochs, native.train.swa_epochs) == (16, 4)


def test_base_errors_name_the_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\nname: a\n")
    b.write_text("base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match=r"base loop: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(a)
    a.write_text("base: tiny_cpus\nname: a\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base 'tiny_cpus': config tiny_cpus not found\. Did you"):
        load_config(a)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.yaml").write_text("base: tiny_cpu\n")
    a.write_text("base: c.yaml\nname: a\n")  # a path is looked for beside the file only, not in the cwd
    with pytest.raises(ConfigError, match=r"a\.yaml: base 'c\.yaml': config .*c\.yaml not found"):
        load_config(a)
    a.write_text("base: elsewhere/c.yaml\n")  # no name of its own: the file's, never the base's
    assert load_config(a).name == "a"
    a.write_text("base: [tiny_cpu]\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base: give a shipped config's name"):
        load_config(a)


def test_config_yaml_round_trip(tmp_path):
    cfg = config_from_dict(_raw(), ["train.ema_decay=0.99"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_confusion_matrix_iou_against_hand_computation():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred[:1], target[:1])  # two batches accumulate into one matrix
    cm.update(pred[1:], target[1:])
    # class 0: tp 1, fp 2 (target 2 -> 0, target 1 -> 0), fn 1 -> 1/4
    # class 1: tp 2, fp 1, fn 1 -> 2/4 ; class 2: tp 1, fp 0, fn 1 -> 1/2 ; class 3 absent -> NaN
    iou = cm.iou()
    assert iou[:3] == pytest.approx([0.25, 0.5, 0.5])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)


def test_numpy_confusion_counts_as_the_torch_matrix_with_ignored_and_out_of_range_pixels():
    """Targets at ``ignore_index``, negative or past the last class are not counted; predictions past the
    last class count as the last class (both as ``ConfusionMatrix``)."""
    target = np.array([[0, 1, 255, -1], [2, 7, 1, 0]])
    pred = np.array([[0, 1, 1, 2], [9, 0, 0, 1]], np.uint8)
    expected = np.zeros((3, 3), int)
    for t, p in [(0, 0), (1, 1), (2, 2), (1, 0), (0, 1)]:  # 255, -1 and 7 dropped; 9 -> class 2
        expected[t, p] += 1
    assert np.array_equal(confusion(pred, target, 3, 255), expected)
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target))
    assert np.array_equal(cm.matrix.numpy(), expected)
    assert confusion(pred, target, 3, None).sum() == 5  # without ignore_index, 255 is still past the classes


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64])
def test_argmax_over_classes_is_numpys_first_largest_class(dtype):
    """Class by class (or packed uint8 keys), with ties to the first class exactly as ``argmax(0)``."""
    rng = np.random.default_rng(0)
    for shape in [(1, 4, 4), (11, 17, 9), (5, 30), (3, 2, 2, 2)]:
        scores = rng.integers(0, 4, shape).astype(dtype)  # few levels: ties on most pixels
        if dtype == np.uint8:
            scores[0, ...] = 255  # the largest level wins over every tie
            scores[-1].flat[::2] = 255
        assert np.array_equal(argmax_classes(scores), scores.argmax(0)), (shape, dtype)
        assert argmax_classes(scores).shape == shape[1:]


def test_confusion_matrix_is_not_a_mean_of_batch_ious():
    cm = ConfusionMatrix(2, None)
    cm.update(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]))  # batch IoU(1) = 1
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 1, 1]))  # batch IoU(1) = 0
    assert cm.iou()[1] == pytest.approx(0.5)
    assert cm.iou()[0] == 0.0  # predicted but never present: a real 0, it stays in the mean
    assert binary_scores(cm) == {"pixel_error": pytest.approx(0.5), "foreground_iou": pytest.approx(0.5)}


def test_empty_or_all_ignored_gives_nan_not_an_error():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(5, dtype=torch.long), torch.full((5,), 255))
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())
    assert np.isnan(cm.iou()).all()


def test_lr_schedule_warmup_then_cosine_and_poly():
    cfg = config_from_dict(_raw(), ["scheduler.warmup_epochs=1", "scheduler.min_lr_ratio=0.1"])
    assert lr_factor(cfg, 0, 100, 10) == pytest.approx(0.1)  # first of 10 warm-up steps
    assert lr_factor(cfg, 9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 55, 100, 10) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos = 0
    assert lr_factor(cfg, 100, 100, 10) == pytest.approx(0.1)
    poly = config_from_dict(_raw(), ["scheduler.name=poly", "scheduler.power=1", "scheduler.min_lr_ratio=0"])
    assert lr_factor(poly, 50, 100, 10) == pytest.approx(0.5)


def test_unet3plus_defaults_that_may_change_are_written_into_run_configs(tmp_path):
    import inspect

    from smp_unet3p import Unet3Plus

    data = {"root": str(tmp_path), "annotations": str(tmp_path / "a.json"), "folds": str(tmp_path / "f.csv")}
    cfg = config_from_dict(
        {"name": "x", "data": data, "model": {"arch": "unet3plus", "params": {"cgm": True}}}
    )
    defaults = inspect.signature(Unet3Plus.__init__).parameters
    assert cfg.model.params == {
        "cgm": True,
        "decoder_upsample_after_conv": defaults["decoder_upsample_after_conv"].default,
        "cgm_gate": defaults["cgm_gate"].default,
    }
    saved = yaml.safe_load(cfg.to_yaml())["model"]["params"]
    assert "decoder_upsample_after_conv" in saved and "cgm_gate" in saved
    explicit = {"arch": "unet3plus", "params": {"decoder_upsample_after_conv": False, "cgm_gate": "soft"}}
    assert config_from_dict({"name": "x", "data": data, "model": explicit}).model.params == explicit["params"]
    other = config_from_dict({"name": "x", "data": data, "model": {"arch": "unetplusplus"}})
    assert other.model.params == {}


def test_decoder_lr_scale_applies_to_everything_outside_the_encoder():
    from competition.train.optim import build_optimizer
    from smp_unet3p import Unet3Plus

    model = Unet3Plus("resnet18", encoder_weights=None, classes=2, deep_supervision=True)
    cfg = config_from_dict(_raw(), ["optimizer.lr=0.01", "optimizer.decoder_lr_scale=10"])
    optimizer = build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter exactly once
    assert {lr_of[id(p)] for p in model.encoder.parameters()} == {0.01}
    assert {round(lr_of[id(p)], 9) for p in model.decoder.parameters()} == {0.1}
    assert {round(lr_of[id(p)], 9) for p in model.side_heads.parameters()} == {0.1}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.decoder.stages[0].fuse[1].weight)] == 0.0  # a norm weight: no decay
    plain = build_optimizer(config_from_dict(_raw(), ["optimizer.lr=0.01"]), model)
    assert len(plain.param_groups) == 2  # one lr: the two groups last.ckpt files of earlier versions hold


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_uses_the_fused_kernel_and_updates_as_the_reference_implementation_does(name):
    from competition.train.optim import build_optimizer

    torch.manual_seed(0)
    # no bias before the norm: its gradient is rounding noise, which Adam's normalisation amplifies
    model = torch.nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    reference = copy.deepcopy(model)
    cfg = config_from_dict(
        _raw(), [f"optimizer.name={name}", "optimizer.lr=0.01", "optimizer.weight_decay=0.1"]
    )
    fused = build_optimizer(cfg, model)
    assert all(g["fused"] for g in fused.param_groups)
    plain = build_optimizer(cfg, reference)
    for group in plain.param_groups:  # the same groups (decay on weights only), torch's default kernel
        group["fused"] = False
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8)
        for net, optimizer in ((model, fused), (reference, plain)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_run_configs_written_before_pinning_keep_the_defaults_of_their_time(tmp_path):
    from competition.core.checkpoint import CONFIG_FILE, read_run_config

    data = {"root": str(tmp_path), "annotations": str(tmp_path / "a.json"), "folds": str(tmp_path / "f.csv")}
    old = {"name": "x", "data": data, "model": {"arch": "unet3plus", "params": {"cgm": True}}}
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(old))
    params = read_run_config(tmp_path).model.params
    assert params == {
        "cgm": True,
        "decoder_upsample_after_conv": True,
        "cgm_gate": "hard",
    }  # not today's soft
    new = config_from_dict(old)
    assert new.model.params["cgm_gate"] == "soft"  # today's default, written explicitly from now on
    (tmp_path / CONFIG_FILE).write_text(new.to_yaml())
    assert read_run_config(tmp_path).model.params["cgm_gate"] == "soft"


def test_class_weights_are_checked_against_the_loss_and_the_classes():
    from competition.train.optim import build_criterion, configured_loss
    from competition.train.preflight import preflight

    with pytest.raises(ConfigError, match=r"override loss\.class_weights=.*greater than 0 \(got -2\.0\)"):
        config_from_dict(_raw(), ["loss.class_weights=[1.0, -2.0]"])
    dice = config_from_dict(_raw(), ["loss.name=dice", "loss.class_weights=[1.0, 2.0]"])
    with pytest.raises(ConfigError, match=r"loss\.class_weights: loss 'dice' has no per-pixel term to weigh"):
        build_criterion(dice, 2)
    cfg = config_from_dict(_raw(), ["loss.class_weights=[1.0, 2.0, 4.0]", "data.classes=[Background,A,B,C]"])
    wrong = r"loss\.class_weights has 3 entries but the model predicts 4 classes \(Background, A, B, C\)"
    with pytest.raises(ConfigError, match=wrong):
        preflight(cfg)  # before any image is read
    with pytest.raises(ConfigError, match=r"predicts 2 classes \(background, cell\)"):
        configured_loss(cfg, 1, ["cell"])
    criterion = build_criterion(cfg, 3)
    assert criterion.loss.terms["ce"].class_weights.tolist() == [1.0, 2.0, 4.0]
