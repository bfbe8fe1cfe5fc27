import math

import numpy as np
import pytest
import torch

from smp_unet3p.losses import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    DiceLoss,
    MSSSIMLoss,
    SoftmaxFocalLoss,
    Unet3PlusHybridLoss,
    WeightedCrossEntropyLoss,
    get_loss,
    unet_weight_map,
)


def confident(target, classes, scale=30.0):
    """Logits that predict ``target`` with near certainty."""
    return (
        torch.nn.functional.one_hot(target.clamp(max=classes - 1), classes).permute(0, 3, 1, 2).float()
        * scale
    )


def test_cross_entropy_by_hand():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)
    target = torch.tensor([[[1, 255]]])
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(-math.log(0.75))
    binary = torch.tensor([[[[0.0]]]])
    assert CrossEntropyLoss()(binary, torch.tensor([[[1]]])).item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("size", [16, 48, 96, 200])
def test_msssim_perfect_prediction_is_zero_and_wrong_is_large(size):
    target = torch.zeros(2, size, size, dtype=torch.long)
    target[:, size // 4 : size // 2, size // 4 : 3 * size // 4] = 1
    target[1, -size // 4 :, :] = 2
    loss = MSSSIMLoss()
    assert loss(confident(target, 3), target).item() == pytest.approx(0.0, abs=1e-4)
    wrong = confident((target + 1) % 3, 3)
    assert loss(wrong, target).item() > 0.5


def test_msssim_ignores_ignored_pixels():
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[:, 10:30, 10:30] = 1
    logits = confident(target, 2)
    logits[:, :, 40:, 40:] = confident(torch.ones(1, 24, 24, dtype=torch.long), 2)  # wrong there
    assert MSSSIMLoss()(logits, target).item() > 0.01
    target[:, 40:, 40:] = 255
    assert MSSSIMLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-4)


def test_dice_ce_is_sum_of_its_terms_and_weights_apply():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 32, 32), torch.randint(0, 4, (2, 32, 32))
    ce = CrossEntropyLoss()(logits, target)
    dice = DiceLoss("multiclass", from_logits=True, ignore_index=255)(logits, target)
    assert DiceCELoss(4)(logits, target).item() == pytest.approx((ce + dice).item(), rel=1e-6)
    assert DiceCELoss(4, weights={"dice": 0.0})(logits, target).item() == pytest.approx(ce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss terms"):
        DiceCELoss(4, weights={"lovasz": 1.0})


@pytest.mark.parametrize("classes", [1, 4])
def test_hybrid_is_near_zero_for_perfect_prediction(classes):
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[:, 16:40, 8:50] = 1 if classes == 1 else 3
    if classes == 1:
        logits = (target.float().unsqueeze(1) * 2 - 1) * 30
    else:
        logits = confident(target, classes)
    loss = Unet3PlusHybridLoss(classes)
    assert loss(logits, target).item() == pytest.approx(0.0, abs=1e-3)
    assert set(loss.last_terms) == {"focal", "msssim", "iou"}
    assert loss(-logits, target).item() > 1.0


def test_deep_supervision_loss_by_hand():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 32, 32))
    target[0][target[0] == 2] = 1  # image 0 lacks class 2
    masks, side_a, side_b = (torch.randn(2, 3, 32, 32) for _ in range(3))
    presence = torch.randn(2, 3)
    ce = CrossEntropyLoss()
    wrapper = DeepSupervisionLoss(ce, classes=3, side_weights=[0.5, 0.25], cgm_weight=0.4)
    output = {"masks": masks, "side_masks": [side_a, side_b], "presence": presence}
    wanted_presence = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(presence, wanted_presence)
    expected = ce(masks, target) + 0.5 * ce(side_a, target) + 0.25 * ce(side_b, target) + 0.4 * bce
    assert wrapper(output, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert wrapper(masks, target).item() == pytest.approx(ce(masks, target).item())
    assert wrapper((masks, presence), target).item() == pytest.approx(ce(masks, target).item())
    with pytest.raises(ValueError, match="side_weights has 2 values but the model gave 1"):
        wrapper({"masks": masks, "side_masks": [side_a]}, target)


def test_weight_map_by_hand():
    mask = np.array([[1, 0, 0, 1, 0, 0]])
    # balanced: 6 px, 2 classes; fg 2 px -> 6/4, bg 4 px -> 6/8
    # border (bg only): d1+d2 = 3, 3, 5, 7 for x = 1, 2, 4, 5
    border = [10 * math.exp(-(s**2) / 50) for s in (3, 3, 5, 7)]
    expected = [1.5, 0.75 + border[0], 0.75 + border[1], 1.5, 0.75 + border[2], 0.75 + border[3]]
    np.testing.assert_allclose(unet_weight_map(mask)[0], expected, rtol=1e-6)
    single = unet_weight_map(np.array([[1, 1, 0, 0]]), class_weights=None)
    np.testing.assert_allclose(single, np.ones((1, 4)))  # one object: no border term
    ignored = unet_weight_map(np.array([[1, 255, 0, 0]]), class_weights=[1.0, 2.0])
    np.testing.assert_allclose(ignored[0], [2.0, 0.0, 1.0, 1.0])


def test_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(1, 3, 8, 8), torch.randint(0, 3, (1, 8, 8))
    weighted = WeightedCrossEntropyLoss()
    ones = torch.ones(1, 8, 8)
    assert weighted(logits, target, ones).item() == pytest.approx(CrossEntropyLoss()(logits, target).item())
    assert weighted(logits, target, 3 * ones).item() == pytest.approx(
        3 * CrossEntropyLoss()(logits, target).item()
    )


@pytest.mark.parametrize(
    "name", ["ce", "dice", "iou", "focal", "lovasz", "msssim", "dice_ce", "hybrid", "tversky"]
)
@pytest.mark.parametrize("classes", [1, 3])
def test_every_named_loss_trains(name, classes):
    logits = torch.randn(2, classes, 40, 40, requires_grad=True)
    target = torch.randint(0, max(classes, 2), (2, 40, 40))
    loss = get_loss(name, classes)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="Did you mean 'dice_ce'"):
        get_loss("dice-ce", 3)


def test_softmax_focal_by_hand():
    from smp_unet3p.losses import SoftmaxFocalLoss

    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # p(class 1) = 0.75
    target = torch.tensor([[[1]]])
    expected = (1 - 0.75) ** 2 * -math.log(0.75)
    assert SoftmaxFocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(expected)
    assert SoftmaxFocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(-math.log(0.75))


def test_class_weighted_cross_entropy_and_focal_by_hand():
    # pixel 1: class 1 at p 0.75; pixel 2: class 0 at p 0.25; pixel 3: ignored
    logits = torch.tensor([[0.0, 0.0, 5.0], [math.log(3.0), math.log(3.0), 0.0]]).view(1, 2, 1, 3)
    target = torch.tensor([[[1, 0, 255]]])
    ce1, ce2 = -math.log(0.75), -math.log(0.25)
    weighted = CrossEntropyLoss(class_weights=[1.0, 3.0])(logits, target).item()
    assert weighted == pytest.approx((3 * ce1 + 1 * ce2) / 4)
    ref = torch.nn.functional.cross_entropy(logits, target, torch.tensor([1.0, 3.0]), ignore_index=255)
    assert weighted == pytest.approx(ref.item())
    assert CrossEntropyLoss(class_weights=[2.0, 2.0])(logits, target).item() == pytest.approx((ce1 + ce2) / 2)
    focal = SoftmaxFocalLoss(gamma=2.0, class_weights=[1.0, 3.0])(logits, target).item()
    assert focal == pytest.approx((3 * 0.25**2 * ce1 + 0.75**2 * ce2) / 4)
    binary = torch.tensor([[[[0.0, math.log(3.0)]]]])  # foreground p 0.5 (target 1) and 0.75 (target 0)
    binary_loss = CrossEntropyLoss(class_weights=[1.0, 5.0])(binary, torch.tensor([[[1, 0]]])).item()
    assert binary_loss == pytest.approx((5 * math.log(2.0) + 1 * -math.log(0.25)) / 6)


def test_class_weights_reach_the_pixel_terms_of_the_hybrids_and_are_refused_elsewhere():
    target = torch.tensor([[[0, 1], [2, 2]]])
    logits = torch.randn(1, 3, 2, 2)
    for name, term in (("dice_ce", "ce"), ("unet3plus_hybrid", "focal"), ("ce", None), ("focal", None)):
        loss = get_loss(name, 3, class_weights=[1.0, 2.0, 4.0])
        weighted = loss.terms[term] if term else loss
        assert weighted.class_weights.tolist() == [1.0, 2.0, 4.0]
        assert torch.isfinite(loss(logits, target))
    with pytest.raises(ValueError, match="loss 'dice' has no per-pixel term to weigh by class"):
        get_loss("dice", 3, class_weights=[1.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="2 class weights for a model with 3 output channel"):
        get_loss("dice_ce", 3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive numbers"):
        CrossEntropyLoss(class_weights=[1.0, 0.0])
