"""Tiny models with known answers for the inference tests."""

from __future__ import annotations

import torch


class Threshold(torch.nn.Module):
    """A 'model' whose answer is known: channel 1 wins where the normalised intensity exceeds 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-10.0, 10.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([5.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
