"""DeepSupervisionLoss against a hand computation, head weighting, and single-tensor use."""

from __future__ import annotations

import monai.losses
import pytest
import torch

from unetpp3d.training.loss import DeepSupervisionLoss, normalise_head_weights

SMOOTH = 1e-5  # MONAI's smooth_nr and smooth_dr defaults
# The loss is computed in float32 (MONAI's DeepSupervisionLoss casts every head), the hand
# computations in float64.
F32 = dict(rtol=1e-5, atol=1e-6)


def hand_dice(prob: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss summed over batch and space per channel ("batch Dice"), then averaged."""
    dims = (0, 2, 3, 4)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + SMOOTH) / (denom + SMOOTH)).mean()


def hand_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    c = logits.shape[1]
    prob = torch.softmax(logits, 1)
    onehot = torch.stack([(target[:, 0] == k).float() for k in range(c)], 1)
    dice = hand_dice(prob[:, 1:], onehot[:, 1:])  # foreground classes only
    ce = -(torch.log_softmax(logits, 1) * onehot).sum(1).mean()
    return dice + ce


def hand_dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    c = logits.shape[1]
    prob = torch.sigmoid(logits)
    onehot = torch.stack([(target[:, 0] == k).float() for k in range(c)], 1)
    dice = hand_dice(prob, onehot)  # every channel, background included
    bce = -(onehot * torch.log(prob) + (1 - onehot) * torch.log(1 - prob)).mean()
    return dice + bce


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    heads = [torch.randn(2, 3, 6, 5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    target = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=g)
    return heads, target


@pytest.mark.parametrize("kind, hand", [("dice_ce", hand_dice_ce), ("dice_bce", hand_dice_bce)])
def test_matches_hand_computation_with_weighted_heads(data, kind, hand):
    heads, target = data
    loss = DeepSupervisionLoss(num_classes=3, head_weights=[1, 3, 4], kind=kind)(heads, target)
    expected = (1 / 8) * hand(heads[0], target) + (3 / 8) * hand(heads[1], target) + (4 / 8) * hand(heads[2], target)
    torch.testing.assert_close(loss.double(), expected, **F32)


def test_auto_weights_are_equal_and_sum_to_one(data):
    heads, target = data
    loss = DeepSupervisionLoss(num_classes=3)(heads, target)
    expected = sum(hand_dice_ce(h, target) for h in heads) / 3
    torch.testing.assert_close(loss.double(), expected, **F32)
    assert normalise_head_weights(4) == [0.25] * 4
    assert normalise_head_weights(2, [2.0, 6.0]) == [0.25, 0.75]


def test_single_tensor_is_one_head(data):
    heads, target = data
    fn = DeepSupervisionLoss(num_classes=3)
    torch.testing.assert_close(fn(heads[0], target), fn([heads[0]], target))
    torch.testing.assert_close(fn(heads[0], target).double(), hand_dice_ce(heads[0], target), **F32)
    # A label map without the channel axis is accepted too.
    torch.testing.assert_close(fn(heads[0], target[:, 0]), fn(heads[0], target))


def test_every_head_gets_a_gradient_and_zero_weight_a_zero_one(data):
    heads, target = data
    heads = [h.clone().requires_grad_(True) for h in heads]
    DeepSupervisionLoss(num_classes=3, head_weights=[1, 0, 1])(heads, target).backward()
    assert heads[0].grad.abs().sum() > 0 and heads[2].grad.abs().sum() > 0
    assert heads[1].grad is not None and heads[1].grad.abs().sum() == 0  # in the graph, for DDP


def test_a_perfect_prediction_scores_near_zero():
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[:, :, 1:3, 1:3, 1:3] = 1
    logits = torch.cat([(target == 0).float(), (target == 1).float()], 1) * 40 - 20
    assert DeepSupervisionLoss(num_classes=2)(logits, target) < 1e-4


def test_half_precision_logits_give_a_float32_loss(data):
    heads, target = data
    loss = DeepSupervisionLoss(num_classes=3)([h.to(torch.bfloat16) for h in heads], target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("weights", [[1, 2], [1, -1, 1], [0, 0, 0]])
def test_bad_head_weights_are_refused(data, weights):
    heads, target = data
    with pytest.raises(ValueError, match="head_weights"):
        DeepSupervisionLoss(num_classes=3, head_weights=weights)(heads, target)


def test_bad_arguments_are_refused(data):
    heads, target = data
    with pytest.raises(ValueError, match="kind"):
        DeepSupervisionLoss(num_classes=3, kind="focal")
    with pytest.raises(ValueError, match="at least 2"):
        DeepSupervisionLoss(num_classes=1)
    with pytest.raises(ValueError, match="channels"):
        DeepSupervisionLoss(num_classes=4)(heads, target)


def previous_dice_ce(heads: list[torch.Tensor], target: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The hand-written sum training/loss.py computed before it used MONAI's DeepSupervisionLoss."""
    term = monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    total = torch.zeros((), dtype=torch.float32)
    for w, logits in zip(weights, heads):
        total = total + w * term(logits.float(), target)
    return total


@pytest.mark.parametrize("n_classes, weights", [(2, [1.0, 1.0, 1.0, 1.0]), (2, [0.1, 0.2, 0.3, 0.4]),
                                                (3, "auto"), (2, "auto")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monai_deep_supervision_gives_the_previous_value(n_classes, weights, seed):
    """MONAI's DeepSupervisionLoss + DiceCELoss replaced our own sum: the same value on random inputs."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.randn(2, n_classes, 8, 6, 4, generator=g) * 3 for _ in range(4)]
    target = torch.randint(0, n_classes, (2, 1, 8, 6, 4), generator=g)
    fn = DeepSupervisionLoss(num_classes=n_classes, head_weights=weights)
    expected = previous_dice_ce(heads, target, normalise_head_weights(4, weights))
    torch.testing.assert_close(fn(heads, target), expected, rtol=1e-6, atol=1e-7)
    if weights != "auto":  # the same arithmetic, term by term: bit for bit
        assert torch.equal(fn(heads, target), expected)
    torch.testing.assert_close(fn([h.to(torch.bfloat16) for h in heads], target),
                               previous_dice_ce([h.to(torch.bfloat16) for h in heads], target,
                                                normalise_head_weights(4, weights)), rtol=1e-6, atol=1e-7)


def test_the_head_sum_is_monais():
    fn = DeepSupervisionLoss(num_classes=2, head_weights=[1, 1])
    assert isinstance(fn.deep_supervision, monai.losses.DeepSupervisionLoss)
    assert isinstance(fn.deep_supervision.loss, monai.losses.DiceCELoss)
    assert fn.deep_supervision.weights == [0.5, 0.5]
