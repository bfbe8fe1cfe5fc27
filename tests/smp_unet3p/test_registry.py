import pytest
import segmentation_models_pytorch as smp
import torch

import smp_unet3p
from smp_unet3p import Unet3Plus


def test_smp_create_model_knows_unet3plus():
    model = smp.create_model("unet3plus", encoder_name="resnet18", encoder_weights=None, classes=2)
    assert isinstance(model, Unet3Plus)
    assert smp.Unet3Plus is Unet3Plus


def test_register_is_idempotent():
    smp_unet3p.register()
    smp_unet3p.register()
    assert smp.MODEL_ARCHITECTURES_MAPPING["unet3plus"] is Unet3Plus
    assert smp._MODEL_ARCHITECTURES.count(Unet3Plus) == 1


@pytest.mark.parametrize(
    "arch", ["Unet", "unetplusplus", "UnetPlusPlus", "DeepLabV3Plus", "FPN", "unet3plus", "Unet3Plus"]
)
def test_create_model_by_name(arch):
    model = smp_unet3p.create_model(arch, "resnet18", encoder_weights=None, classes=3).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_every_smp_architecture_is_available():
    names = smp_unet3p.available_architectures()
    assert set(smp.MODEL_ARCHITECTURES_MAPPING) <= set(names)
    assert "unet3plus" in names


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean 'unet3plus'"):
        smp_unet3p.create_model("unet3pluss", "resnet18", encoder_weights=None)
