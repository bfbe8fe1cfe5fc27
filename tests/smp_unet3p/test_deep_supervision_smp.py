"""Deep supervision for smp's own Unet and UnetPlusPlus (issue 24): side outputs in train mode, smp's model
and outputs exactly in eval mode, through create_model, save/from_pretrained, export, loss and pipeline."""

import pytest
import segmentation_models_pytorch as smp
import torch

import smp_unet3p
from smp_unet3p import DSUnet, DSUnetPlusPlus
from smp_unet3p.losses import DeepSupervisionLoss, get_loss

CASES = [("unet", DSUnet, smp.Unet, 4), ("unetplusplus", DSUnetPlusPlus, smp.UnetPlusPlus, 3)]


@pytest.mark.parametrize(("arch", "cls", "base", "sides"), CASES)
def test_side_outputs_in_train_mode_and_smps_output_in_eval(arch, cls, base, sides):
    model = smp_unet3p.create_model(arch, "resnet18", encoder_weights=None, classes=3, deep_supervision=True)
    assert type(model) is cls and isinstance(model, base)
    x = torch.randn(2, 3, 64, 96)
    out = model.train()(x)
    assert out["masks"].shape == (2, 3, 64, 96) and len(out["side_masks"]) == sides
    assert all(s.shape == (2, 3, 64, 96) for s in out["side_masks"])
    loss = DeepSupervisionLoss(get_loss("dice_ce", 3), 3)(out, torch.randint(0, 3, (2, 64, 96)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.side_heads.parameters())
    # eval: exactly smp's model with the same weights, a plain tensor
    plain = base("resnet18", encoder_weights=None, classes=3)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("side_heads.") for k in unexpected)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
    assert not any("_side_output" in m.__dict__ for m in model.modules())  # nothing kept between calls
    off = smp_unet3p.create_model(arch, "resnet18", encoder_weights=None, classes=3, deep_supervision=False)
    assert off.side_heads is None and isinstance(off.train()(x), torch.Tensor)


def test_unetplusplus_sides_are_the_nested_full_resolution_nodes():
    model = DSUnetPlusPlus("resnet18", encoder_weights=None, classes=2, deep_supervision=True)
    depth = model.decoder.depth
    taps = model._taps()
    assert taps == [model.decoder.blocks[f"x_{d}_{depth - 1}"] for d in (3, 2, 1)]
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.shape)) for n, m in enumerate(taps)
    ]
    model.eval()(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert {shape[-2:] for shape in seen.values()} == {(32, 32)}  # all at the decoder's highest resolution


def test_aux_labels_export_and_save_round_trip(tmp_path):
    aux = {"classes": 3, "dropout": 0.0}
    model = DSUnet("resnet18", encoder_weights=None, classes=3, deep_supervision=True, aux_params=aux)
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert out["labels"].shape == (2, 3) and len(out["side_masks"]) == 4
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    masks, labels = model(x)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x)[0], masks)
    model.save_pretrained(tmp_path / "m")
    loaded = smp.from_pretrained(str(tmp_path / "m"))
    assert type(loaded) is DSUnet and loaded.side_heads is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x)[0], masks)


def test_the_pipeline_trains_unetplusplus_with_deep_supervision(synthetic_data, tmp_path):
    from competition.core.config import ConfigError
    from competition.core.config_file import config_from_dict
    from competition.core.runtime import build_model
    from competition.train.loop import train
    from competition.train.optim import build_criterion
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(synthetic_data, tmp_path, epochs=1, oof="none")
    raw["model"] = {"arch": "unetplusplus", "encoder_name": "resnet18", "encoder_weights": None}
    raw["model"]["params"] = {"deep_supervision": True, "decoder_channels": [64, 32, 16, 16, 8]}
    raw["loss"] = {"name": "dice_ce", "side_weight": 0.5}
    cfg = config_from_dict(raw)
    model = build_model(cfg, 11).train()
    terms = build_criterion(cfg, 11).terms(
        model(torch.randn(2, 3, 64, 64)), torch.randint(0, 11, (2, 64, 64))
    )
    assert set(terms) == {"masks", "side0", "side1", "side2"}
    train(cfg, "0")
    assert (cfg.run_dir(0) / "best.safetensors").is_file()
    raw["model"]["arch"] = "fpn"
    with pytest.raises(ConfigError, match="deep_supervision"):
        config_from_dict(raw)  # FPN has no deep-supervised variant: refused, not dropped
