import tempfile

import pytest
import segmentation_models_pytorch as smp
import torch

import smp_unet3p
from smp_unet3p import Unet3Plus
from smp_unet3p.modules.cgm import ABSENT_LOGIT_OFFSET, gate_logits, presence_from_mask


def build(encoder="resnet18", **kw):
    kw.setdefault("encoder_weights", None)
    return Unet3Plus(encoder, **kw)


@pytest.mark.parametrize(
    "encoder,depth",
    [
        ("resnet18", 3),
        ("resnet18", 4),
        ("resnet18", 5),
        ("resnet50", 5),
        ("efficientnet-b0", 4),
        ("tu-resnet18", 5),
        ("tu-efficientnet_b0", 3),
        ("tu-convnext_atto", 5),
        ("tu-convnext_atto", 4),
        ("mit_b0", 5),
    ],
)
def test_shapes_over_encoders_and_depths(encoder, depth):
    model = build(encoder, encoder_depth=depth, classes=3, deep_supervision=True).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 64, 64)
    model.train()
    out = model(x)
    assert out["masks"].shape == (2, 3, 64, 64)
    assert len(out["side_masks"]) == depth - 1
    assert all(s.shape == (2, 3, 64, 64) for s in out["side_masks"])


@pytest.mark.parametrize("in_channels", [1, 3, 4])
def test_in_channels(in_channels):
    model = build("resnet18", in_channels=in_channels, classes=2).eval()
    with torch.no_grad():
        assert model(torch.rand(1, in_channels, 64, 64)).shape == (1, 2, 64, 64)


def test_decoder_follows_the_paper_layout():
    model = build("resnet34", classes=11)
    dec = model.decoder
    assert dec.out_channels == 320
    # 4 stages for depth 5, each fusing 5 scales of 64 channels
    assert len(dec.stages) == 4
    for stage in dec.stages:
        assert len(stage.branches) == 5
        assert stage.fuse[0].in_channels == 320
    # stage at level 4 (stride 16): E1 pooled by 8, E2 by 4, E3 by 2, E4 same, E5 upsampled
    first = dec.stages[0]
    assert [b.pool for b in first.branches] == [8, 4, 2, 1, 1]
    assert [b.upsample for b in first.branches] == [False, False, False, False, True]
    # stride-2 stage: E1 same scale, X2, X3, X4, E5 upsampled
    last = dec.stages[-1]
    assert [b.upsample for b in last.branches] == [False, True, True, True, True]


def test_zero_channel_stage_is_skipped():
    model = build("tu-convnext_atto", classes=2)
    assert model.encoder.out_channels[1] == 0
    stride2 = model.decoder.stages[-1]
    assert len(stride2.branches) == 4  # no E1 branch
    assert stride2.fuse[0].in_channels == 4 * 64


def test_non_divisible_input_gives_smp_error():
    model = build().eval()
    with pytest.raises(RuntimeError, match="divisible by 32"):
        model(torch.rand(1, 3, 67, 71))


def test_default_train_output_is_plain_tensor_like_smp():
    model = build()
    out = model(torch.rand(1, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 64, 64)
    out.mean().backward()


def test_gradient_reaches_every_parameter():
    model = build("resnet18", classes=3, deep_supervision=True, cgm=True, cgm_dropout=0.0)
    out = model(torch.rand(2, 3, 64, 64))
    loss = out["masks"].square().mean() + sum(s.square().mean() for s in out["side_masks"])
    loss = loss + out["presence"].square().mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_cgm_hard_gate_zeroes_absent_class():
    model = build("resnet18", classes=3, cgm=True, cgm_gate="hard").eval()
    conv = model.cgm[1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-50.0, 50.0, -50.0]))  # class 2 absent, background "absent" too
        probs = model(torch.rand(2, 3, 64, 64)).softmax(1)
    assert probs[:, 2].max() < 1e-6
    # background is never gated: it keeps its probability mass
    assert probs[:, 0].max() > 1e-3
    assert torch.allclose(probs.sum(1), torch.ones(2, 64, 64))


def test_cgm_binary_absent_gives_empty_mask_and_present_changes_nothing():
    model = build("resnet18", classes=1, cgm=True, cgm_gate="hard", activation="sigmoid").eval()
    conv = model.cgm[1]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-20.0)
        assert model(x).max() < 1e-6
        conv.bias.fill_(20.0)
        gated = model(x)
        model.cgm = None
        assert torch.equal(gated, model(x))


def test_gate_logits_soft_is_log_probability_offset():
    masks = torch.zeros(1, 3, 2, 2)
    presence = torch.tensor([[0.0, 0.0, 2.0]])  # sigmoid: 0.5, 0.5, 0.8808
    gated = gate_logits(masks, presence, mode="soft")
    expected = torch.tensor([0.0, torch.log(torch.tensor(0.5)), torch.log(torch.sigmoid(torch.tensor(2.0)))])
    assert torch.allclose(gated[0, :, 0, 0], expected)
    hard = gate_logits(masks, torch.tensor([[-5.0, -5.0, 5.0]]), mode="hard")
    assert hard[0, :, 0, 0].tolist() == [0.0, ABSENT_LOGIT_OFFSET, 0.0]
    with pytest.raises(ValueError, match="hard' or 'soft"):
        gate_logits(masks, presence, mode="medium")


def test_presence_from_mask_by_hand():
    mask = torch.tensor([[[0, 2], [2, 255]], [[1, 1], [255, 255]]])
    assert presence_from_mask(mask, classes=4).tolist() == [[1, 0, 1, 0], [0, 1, 0, 0]]
    binary = torch.tensor([[[0, 0], [0, 0]], [[0, 1], [0, 0]]])
    assert presence_from_mask(binary, classes=1).tolist() == [[0.0], [1.0]]
    with pytest.raises(ValueError, match="outside"):
        presence_from_mask(torch.tensor([[[5]]]), classes=4)


def test_cgm_train_output_exposes_presence_and_ungated_masks():
    model = build("resnet18", classes=4, cgm=True)
    out = model(torch.rand(2, 3, 64, 64))
    assert set(out) == {"masks", "presence"}
    assert out["presence"].shape == (2, 4)


def test_aux_params_classification_head():
    model = build(aux_params={"classes": 5, "pooling": "max", "dropout": 0.1}).eval()
    masks, labels = model(torch.rand(2, 3, 64, 64))
    assert masks.shape == (2, 1, 64, 64) and labels.shape == (2, 5)
    model.train()
    model.deep_supervision = True
    model.side_heads = None  # still dict-free without extra heads
    masks, labels = model(torch.rand(2, 3, 64, 64))
    assert labels.shape == (2, 5)


def test_activation_applies_after_gating():
    model = build(classes=3, activation="softmax", cgm=True).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 64))
    assert torch.allclose(y.sum(1), torch.ones(1, 64, 64), atol=1e-5)


def test_torch_export_matches_eager():
    model = build(classes=3, deep_supervision=True, cgm=True).eval()
    x = torch.rand(1, 3, 64, 64)
    exported = torch.export.export(model, args=(x,), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    model = build().eval()
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.inference_mode():
        assert compiled(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_torch_script_flag_is_honest():
    model = build().eval()
    assert model._is_torch_scriptable is False
    with pytest.raises(RuntimeError):
        torch.jit.script(model)


@pytest.mark.parametrize("loader", ["class", "smp"])
def test_save_and_from_pretrained_round_trip(loader):
    model = build("resnet18", classes=3, deep_supervision=True, cgm=True, decoder_cat_channels=16).eval()
    x = torch.rand(1, 3, 64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, dataset="demo", metrics={"miou": 0.5})
        restored = Unet3Plus.from_pretrained(tmp) if loader == "class" else smp.from_pretrained(tmp)
    restored.eval()
    assert isinstance(restored, Unet3Plus)
    assert restored.config["decoder_cat_channels"] == 16 and restored.config["cgm"] is True
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="encoder_depth"):
        build(encoder_depth=2)
    with pytest.raises(ValueError, match="cgm_gate"):
        build(cgm_gate="fuzzy")
    with pytest.raises(ValueError, match="classes"):
        build(classes=0)


def test_version_exposed():
    assert smp_unet3p.__version__


def test_upsample_after_conv_keeps_weights_interchangeable_and_saves_flops():
    from torch.utils.flop_counter import FlopCounterMode

    fast = Unet3Plus("resnet18", encoder_weights=None, classes=3, decoder_cat_channels=8).eval()
    paper = Unet3Plus(
        "resnet18", encoder_weights=None, classes=3, decoder_cat_channels=8, decoder_upsample_after_conv=False
    ).eval()
    paper.load_state_dict(fast.state_dict())  # same keys and shapes: checkpoints load into both orders
    x = torch.rand(1, 3, 64, 64)
    flops = []
    with torch.no_grad():
        for model in (fast, paper):
            with FlopCounterMode(display=False) as counter:
                out = model(x)
            flops.append(counter.get_total_flops())
            assert out.shape == (1, 3, 64, 64)
        assert not torch.allclose(fast(x), paper(x))  # the order is real, not a no-op flag
    assert flops[0] < 0.8 * flops[1]


def test_main_and_side_heads_upsample_alike_with_align_corners_false():
    torch.manual_seed(0)
    model = Unet3Plus("resnet18", encoder_weights=None, classes=3, deep_supervision=True).train()
    x = torch.rand(1, 3, 64, 64)
    out = model(x)
    stages = model.decoder(model.encoder(x))
    by_hand = torch.nn.functional.interpolate(
        model.segmentation_head(stages[0]), size=(64, 64), mode="bilinear", align_corners=False
    )
    assert torch.allclose(out["masks"], by_hand, atol=1e-5)
    side = torch.nn.functional.interpolate(
        model.side_heads[0](stages[1]), size=(64, 64), mode="bilinear", align_corners=False
    )
    assert torch.allclose(out["side_masks"][0], side, atol=1e-5)
    corners_true = torch.nn.functional.interpolate(
        model.segmentation_head(stages[0]), size=(64, 64), mode="bilinear", align_corners=True
    )
    assert not torch.allclose(out["masks"], corners_true, atol=1e-5)  # the test tells the two apart
