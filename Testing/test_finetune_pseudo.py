"""Pseudo-label confidence masking and the masked Dice+CE loss, on constructed probability maps."""

from __future__ import annotations

import torch

from vocoslicer.train.pseudo import confident_pseudo_labels, masked_dice_ce


def _logits_from_probs(probs: torch.Tensor) -> torch.Tensor:
    return torch.log(probs.clamp_min(1e-8))


def test_confidence_mask_keeps_only_confident_voxels() -> None:
    # 3 classes on a 1x4 strip: confident bg, confident class 2, unsure (0.5/0.4/0.1), exactly at threshold
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.02, 0.03, 0.95], [0.5, 0.4, 0.1], [0.05, 0.9, 0.05]])
    logits = _logits_from_probs(probs.T.reshape(1, 3, 1, 1, 4))
    labels, mask = confident_pseudo_labels(logits, threshold=0.9)
    assert labels.shape == (1, 1, 1, 1, 4) and mask.dtype == torch.bool
    assert labels.flatten().tolist() == [0, 2, 0, 1]
    assert mask.flatten().tolist() == [True, True, False, True]
    _, strict = confident_pseudo_labels(logits, threshold=0.96)
    assert not strict.any()


def test_masked_loss_ignores_unconfident_voxels() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[:, :, :2] = True
    good = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 5.0  # right where it counts
    # wrong predictions only in the ignored half: the loss must not notice them
    bad_outside = good.clone()
    bad_outside[:, :, 2:] = torch.roll(good[:, :, 2:], 1, dims=1)
    low = masked_dice_ce(good, target, mask)
    assert torch.isclose(masked_dice_ce(bad_outside, target, mask), low, atol=1e-5)
    assert low < 0.05
    # the same errors inside the confident half do count
    bad_inside = good.clone()
    bad_inside[:, :, :2] = torch.roll(good[:, :, :2], 1, dims=1)
    assert masked_dice_ce(bad_inside, target, mask) > low + 1.0
    # gradients flow only through confident voxels
    x = bad_outside.clone().requires_grad_(True)
    masked_dice_ce(x, target, mask).backward()
    assert x.grad[:, :, 2:].abs().max() == 0 and x.grad[:, :, :2].abs().max() > 0
    # nothing confident: zero loss, zero gradient, no NaN
    y = good.clone().requires_grad_(True)
    none = masked_dice_ce(y, target, torch.zeros_like(mask))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.isfinite(y.grad).all() and y.grad.abs().max() == 0
