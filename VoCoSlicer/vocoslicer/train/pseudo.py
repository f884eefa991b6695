"""Pseudo-labels with a confidence mask, and the Dice+CE loss that ignores the unconfident voxels.

The official semi-supervised baseline (voco_spec.md §7.1) trains on the teacher's hard argmax everywhere. With a
handful of corrected cases the teacher is wrong mostly where it is unsure (organ borders, unseen anatomy), and
learning those mistakes back reinforces them. Keeping only voxels whose top softmax probability reaches a
threshold, and giving the rest no weight in either loss term, is the usual remedy (FixMatch-style).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def confident_pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, ...) teacher logits → (pseudo labels (B, 1, ...) long, mask (B, 1, ...) bool: max prob ≥ threshold)."""
    probs = torch.softmax(logits.float(), dim=1)
    conf, labels = probs.max(dim=1, keepdim=True)
    return labels, conf >= float(threshold)


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, include_background: bool = False,
                   ce_weight: float = 1.0, dice_weight: float = 1.0) -> torch.Tensor:
    """DiceCE (MONAI's Dice, softmax, one-hot target) restricted to ``mask``; 0 when nothing is confident.

    ``target`` and ``mask`` are (B, 1, ...). Masked voxels contribute neither to the cross-entropy mean nor to the
    Dice overlaps/volumes (both prediction and one-hot target are zeroed there), so they carry no gradient.
    """
    from monai.losses import DiceLoss

    logits = logits.float()
    weight = mask.to(logits.dtype)
    n_conf = weight.sum()
    ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none")  # (B, ...)
    ce = (ce * weight[:, 0]).sum() / n_conf.clamp(min=1.0)
    probs = torch.softmax(logits, dim=1) * weight
    onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype) * weight
    dice = DiceLoss(include_background=include_background, to_onehot_y=False, softmax=False, batch=True)(probs, onehot)
    # with no confident voxel both terms are exactly 0 (Dice: smooth/smooth = 1 per class), with a zero gradient
    return ce_weight * ce + dice_weight * dice
