"""Additive 3D rotary position embedding of PUMIT (spec §3.4): EVA-02's 2D RoPE plus a depth rotation.

For head dim h there are h/2 rotation pairs; pair j < h/4 turns by d·ν_j + y·ω_j, pair h/4 + j by d·ν_j + x·ω_j with
ω_j = base_hw^(−2j/(h/2)) and ν_j = base_d^(−(2j+1)/(h/2)) (odd exponents interleave the in-plane ones). Pairs are
interleaved (dims 2i, 2i+1) and positions are raw integer token indices, so a 2D image (d = 0) gets exactly
EVA-02's pre-training 2D RoPE. Because each pair's angle is linear in (d, y, x), q·k depends only on the relative
3D offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def rope_frequencies(head_dim: int, bases: Sequence[float] = (2333.0, 10000.0, 10000.0)):
    """(ν depth, ω in-plane) frequency vectors, each of length head_dim / 4."""
    if head_dim % 4:
        raise ValueError(f"3D RoPE needs a head dim divisible by 4, got {head_dim}")
    n = head_dim // 2
    j = torch.arange(head_dim // 4, dtype=torch.float64)
    omega = float(bases[1]) ** (-2 * j / n)
    nu = float(bases[0]) ** (-(2 * j + 1) / n)
    return nu, omega


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x_2i, x_2i+1) -> (−x_2i+1, x_2i) for interleaved pairs."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), -1).flatten(-2)


class Rope3D(nn.Module):
    """Builds cos/sin tables (L, head_dim) for a (d, h, w) token grid and rotates q/k with them."""

    def __init__(self, head_dim: int, bases: Sequence[float] = (2333.0, 10000.0, 10000.0)) -> None:
        super().__init__()
        nu, omega = rope_frequencies(head_dim, bases)
        self.register_buffer("nu", nu.float(), persistent=False)
        self.register_buffer("omega", omega.float(), persistent=False)

    def angles(self, grid: Sequence[int]) -> torch.Tensor:
        """(L, head_dim/2) pair angles for a row-major (d, h, w) grid, in float64-free fp32."""
        d, h, w = (torch.arange(n, device=self.nu.device, dtype=torch.float32) for n in grid)
        dd, hh, ww = torch.meshgrid(d, h, w, indexing="ij")
        dd, hh, ww = dd.reshape(-1, 1), hh.reshape(-1, 1), ww.reshape(-1, 1)
        first = dd * self.nu + hh * self.omega
        second = dd * self.nu + ww * self.omega
        return torch.cat((first, second), -1)

    def tables(self, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (L, head_dim), interleaved (each pair angle repeated for its two dims)."""
        theta = self.angles(grid).repeat_interleave(2, -1)
        return theta.cos(), theta.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (..., L, head_dim); cos/sin broadcast against it (fp32 math, result in x's dtype)."""
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
