"""PUMIT patch discriminator (``SimplePatchDiscriminator``): fully SAC, so it sees the same DA as the tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vocoslicer.models.pumit.sac import SacConv3d, SacSequential


class PatchDiscriminator(nn.Module):
    """3x [SAC conv k3 s2, GN, LeakyReLU] -> post convs -> 1-channel patch logits at 1/8 in-plane."""

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (128, 256, 512), num_post_convs: int = 1,
                 groups: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_prev = in_channels
        for c in channels:
            layers += [SacConv3d(c_prev, c, 3, 2, 1), nn.GroupNorm(min(groups, c), c), nn.LeakyReLU(0.01)]
            c_prev = c
        for _ in range(num_post_convs):
            layers += [SacConv3d(c_prev, c_prev, 3, 1, 1), nn.GroupNorm(min(groups, c_prev), c_prev),
                       nn.LeakyReLU(0.01)]
        layers.append(SacConv3d(c_prev, 1, 3, 1, 1))
        self.main = SacSequential(*layers)

    def forward(self, x: torch.Tensor, aniso_d: int = 0) -> torch.Tensor:  # type: ignore[override]
        logits, _ = self.main(x, aniso_d, 0)
        return logits
