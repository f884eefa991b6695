"""Spatially adaptive convolution (SAC) of PUMIT: one set of isotropic 3D weights for images of any spacing.

A feature map's spacing state is the pair ``(aniso_d, nd)``: ``aniso_d`` = degree of anisotropy (DA) of the
*input image* (floor log2 of depth spacing / in-plane spacing, see :mod:`vocoslicer.data.anisotropy`) and ``nd`` =
log2 of the cumulative in-plane down-sampling so far. The feature map's current DA is ``max(aniso_d - nd, 0)``:
while it is > 0 the depth axis is coarser than the in-plane axes, so depth is not down-sampled and depth kernels
are collapsed by *summing* consecutive taps (a volume constant along depth then gives the same response as the
full kernel, which keeps activation statistics like 2D->3D weight inflation).

Carrier choice (documented deviation): the official code carries the state inside a ``torch.Tensor`` subclass
(``SpatialTensor``). We pass it explicitly: every SAC module has ``forward(x, aniso_d, nd) -> (y, nd_out)`` and
:class:`SacSequential` threads the state through a mix of SAC and ordinary modules. Plain tensors keep autocast,
``torch.compile`` and gradient checkpointing working (the subclass breaks the latter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pending_downsamples(aniso_d: int, nd: int) -> int:
    """Current DA of a feature map: in-plane down-samplings still needed before depth may be down-sampled."""
    return max(aniso_d - nd, 0)


def remained_depth_up(aniso_d: int, nd: int) -> int:
    """Number of depth down-samplings an up-sampler may undo."""
    return max(nd - aniso_d, 0)


def _log2_exact(s: int) -> int:
    m = int(s).bit_length() - 1
    if s < 1 or (1 << m) != s:
        raise ValueError(f"SAC stride must be a power of two, got {s}")
    return m


def depth_stride(stride: int, aniso_d: int, nd: int) -> int:
    """Depth stride that a k = s = 2^m down-sampling SAC conv uses for a feature map in state (aniso_d, nd)."""
    return max(stride >> pending_downsamples(aniso_d, nd), 1)


def reduce_depth_taps(weight: torch.Tensor, target: int, dim: int = 2) -> torch.Tensor:
    """Sum consecutive depth taps of a conv kernel down to ``target`` taps (groups of ``kd / target``)."""
    kd = weight.shape[dim]
    if target == kd:
        return weight
    if target < 1 or kd % target:
        raise ValueError(f"cannot reduce a depth kernel of {kd} taps to {target}")
    shape = list(weight.shape)
    shape[dim : dim + 1] = [target, kd // target]
    return weight.reshape(shape).sum(dim + 1)


def inflate_2d_kernel(weight: torch.Tensor, kd: int, mode: str = "average") -> torch.Tensor:
    """Turn a 2D kernel (co, ci, kh, kw) into a 3D one with ``kd`` depth taps (loading 2D weights into SAC)."""
    if mode == "average":
        return weight.unsqueeze(2).repeat(1, 1, kd, 1, 1) / kd
    if mode == "center":
        out = weight.new_zeros(weight.shape[0], weight.shape[1], kd, *weight.shape[2:])
        if kd % 2:
            out[:, :, kd // 2] = weight
        else:
            out[:, :, kd // 2 - 1] = weight / 2
            out[:, :, kd // 2] = weight / 2
        return out
    raise ValueError(f"unknown inflation mode {mode!r} (average|center)")


def adapt_in_channels(weight: torch.Tensor, c_new: int) -> torch.Tensor:
    """Input-channel change of a conv kernel: every new channel gets ``sum_c w[:, c] / c_new``."""
    if weight.shape[1] == c_new:
        return weight
    summed = weight.sum(1, keepdim=True) / c_new
    return summed.expand(-1, c_new, *weight.shape[2:]).contiguous()


RGB_TO_L = (0.299, 0.587, 0.114)


def adapt_out_channels(weight: torch.Tensor, bias: torch.Tensor | None, c_new: int, mode: str = "rgb_l"):
    """Output-channel change 3 -> 1 (BT.601 luminance weights) or any -> ``c_new`` by averaging."""
    c_old = weight.shape[0]
    if c_old == c_new:
        return weight, bias
    if mode == "rgb_l" and c_old == 3 and c_new == 1:
        coef = weight.new_tensor(RGB_TO_L)
        w = torch.einsum("c,c...->...", coef, weight).unsqueeze(0)
        b = None if bias is None else (coef * bias).sum().reshape(1)
        return w, b
    w = weight.mean(0, keepdim=True).expand(c_new, *weight.shape[1:]).contiguous()
    b = None if bias is None else bias.mean().expand(c_new).contiguous()
    return w, b


def resample(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resize (N, C, *spatial): area for shrinking axes, then (tri/bi)linear for growing ones."""
    shape = tuple(int(s) for s in shape)
    cur = tuple(x.shape[2:])
    if cur == shape:
        return x
    down = tuple(min(c, s) for c, s in zip(cur, shape, strict=True))
    if down != cur:
        x = F.interpolate(x, down, mode="area")
    if down != shape:
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
        x = F.interpolate(x, shape, mode=mode, align_corners=False)
    return x


class SacModule(nn.Module):
    """Marker base: ``forward(x, aniso_d, nd) -> (y, nd_out)``."""


class SacConv3d(nn.Conv3d, SacModule):
    """Isotropic conv (k, s, p) whose depth kernel/stride/padding adapt to the feature map's current DA.

    Supported: down-sampling k = s = 2^m (p = 0), k = 3 with s = 1 or s = 2^m (p = 1), and k = 1.
    ``adaptive=False`` makes it a plain Conv3d that only does the (aniso_d, nd) bookkeeping.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, adaptive: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.m = _log2_exact(stride)
        if kernel_size not in (1, 3) and kernel_size != stride:
            raise ValueError("SAC conv needs k == s (down-sampling) or k in (1, 3)")
        self.adaptive = adaptive

    def adapted(self, aniso_d: int, nd: int) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
        """The (weight, stride, padding) this conv uses for state (aniso_d, nd)."""
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        pending = pending_downsamples(aniso_d, nd)
        if not self.adaptive or pending == 0 or k == 1:
            return self.weight, (s, s, s), (p, p, p)
        s_d = depth_stride(s, aniso_d, nd)
        if s_d == 1:
            weight = self.weight.sum(2, keepdim=True)  # k == s or k == 3: collapse all depth taps
        else:  # only reachable for k == s
            weight = reduce_depth_taps(self.weight, s_d)
        return weight, (s_d, s, s), (0, p, p)

    def forward(self, x: torch.Tensor, aniso_d: int = 0, nd: int = 0) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        weight, stride, padding = self.adapted(aniso_d, nd)
        y = F.conv3d(x, weight, self.bias, stride, padding)
        return y, nd + self.m


class SacTransposedConv3d(nn.ConvTranspose3d, SacModule):
    """Transposed conv k = s = 2^m that up-samples depth only by what earlier SAC convs took away."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool = True,
                 adaptive: bool = True) -> None:
        super().__init__(in_channels, out_channels, stride, stride, bias=bias)
        self.m = _log2_exact(stride)
        self.adaptive = adaptive

    def depth_stride(self, aniso_d: int, nd: int) -> int:
        s = self.stride[0]
        return s if not self.adaptive else min(1 << remained_depth_up(aniso_d, nd), s)

    def forward(self, x: torch.Tensor, aniso_d: int = 0, nd: int = 0) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        s = self.stride[0]
        s_d = self.depth_stride(aniso_d, nd)
        weight = self.weight if s_d == s else reduce_depth_taps(self.weight, s_d)
        y = F.conv_transpose3d(x, weight, self.bias, (s_d, s, s))
        return y, nd - self.m


class SacSequential(nn.Sequential, SacModule):
    """Sequential that threads (aniso_d, nd) through SAC modules and calls other modules with ``x`` only."""

    def forward(self, x: torch.Tensor, aniso_d: int = 0, nd: int = 0) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        for module in self:
            if isinstance(module, SacModule):
                x, nd = module(x, aniso_d, nd)
            else:
                x = module(x)
        return x, nd


class LayerNormNd(nn.LayerNorm):
    """LayerNorm over the channel axis of (N, C, *spatial) maps (channels-last normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class SacUpsample(SacSequential):
    """Transposed-conv up-sampling (k = s = 2) followed by [SAC conv k3, GroupNorm, LeakyReLU]."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8, adaptive: bool = True) -> None:
        super().__init__()
        self.transposed_conv = SacTransposedConv3d(in_channels, out_channels, 2, adaptive=adaptive)
        self.conv = SacSequential(
            SacConv3d(out_channels, out_channels, 3, 1, 1, adaptive=adaptive),
            nn.GroupNorm(min(groups, out_channels), out_channels),
            nn.LeakyReLU(0.01),
        )
