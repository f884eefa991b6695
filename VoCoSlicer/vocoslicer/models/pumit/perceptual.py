"""Perceptual loss for the tokenizer: LPIPS-style distance on 2D slices with a pluggable frozen feature network.

The official tokenizer uses LPIPS on torchvision's ImageNet VGG16 (spec §2.4). Those weights cannot be shipped or
downloaded here, so the default feature network is a *frozen, seeded, randomly initialised* small conv net (a
random-feature perceptual loss: still a multi-scale, edge/texture-sensitive distance that beats plain L1 for
sharpness). Users who have the weights locally can load the real LPIPS-VGG16 with :func:`lpips_vgg16`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vocoslicer.errors import UserError

# the original LPIPS ScalingLayer (inputs in [-1, 1]); PUMIT flipped the shift sign (spec §9.3), we do not
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_CUTS = (4, 9, 16, 23, 30)  # torchvision feature indices: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class SlicedFeatures(nn.Module):
    """A ``features`` Sequential cut into stages; returns the output of every stage."""

    def __init__(self, features: nn.Sequential, cuts: Sequence[int]) -> None:
        super().__init__()
        self.features = features
        self.cuts = tuple(cuts)

    @property
    def channels(self) -> list[int]:
        out, c = [], 0
        for i, m in enumerate(self.features):
            if isinstance(m, nn.Conv2d):
                c = m.out_channels
            if i + 1 in self.cuts:
                out.append(c)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        outs, start = [], 0
        for cut in self.cuts:
            for m in self.features[start:cut]:
                x = m(x)
            outs.append(x)
            start = cut
        return outs


def _vgg_features(cfg: Sequence, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            c = int(v)
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """LPIPS-form distance: unit-normalise channels, squared difference, per-channel weights, spatial mean, sum.

    3D inputs are compared slice by slice (at most ``max_slices`` random depth indices per volume while training,
    the same indices for both inputs). Frozen; gradients flow only into the reconstruction.
    """

    def __init__(self, net: SlicedFeatures, lin: Sequence[torch.Tensor] | None = None, scale: float = 1.0,
                 max_slices: int = 24, shift: Sequence[float] | None = None,
                 norm_scale: Sequence[float] | None = None) -> None:
        super().__init__()
        self.net = net
        chans = net.channels
        weights = lin if lin is not None else [torch.full((c,), 1.0 / c) for c in chans]
        for i, w in enumerate(weights):
            self.register_buffer(f"lin{i}", w.reshape(1, -1, 1, 1).float())
        self.n_layers = len(chans)
        self.scale, self.max_slices = scale, max_slices
        c_in = next(m.in_channels for m in net.features if isinstance(m, nn.Conv2d))
        self.register_buffer("shift", torch.tensor(shift or (0.0,) * c_in).reshape(1, -1, 1, 1))
        self.register_buffer("norm_scale", torch.tensor(norm_scale or (1.0,) * c_in).reshape(1, -1, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:  # frozen network: always eval (no BN/dropout drift)
        return super().train(False)

    def _slices(self, x: torch.Tensor, x_rec: torch.Tensor, generator: torch.Generator | None):
        n, c, d = x.shape[:3]
        if d > self.max_slices and torch.is_grad_enabled():
            idx = torch.stack([torch.randperm(d, generator=generator)[: self.max_slices] for _ in range(n)])
            idx = idx.to(x.device).view(n, 1, -1, 1, 1).expand(-1, c, -1, *x.shape[3:])
            x, x_rec = x.gather(2, idx), x_rec.gather(2, idx)
        to2d = lambda t: t.movedim(2, 1).reshape(-1, c, *t.shape[3:])  # noqa: E731
        return to2d(x), to2d(x_rec)

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor,  # type: ignore[override]
                generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() == 5:
            x, x_rec = self._slices(x, x_rec, generator)
        x = (x.float() - self.shift) / self.norm_scale
        x_rec = (x_rec.float() - self.shift) / self.norm_scale
        total = x.new_zeros(())
        for i, (fa, fb) in enumerate(zip(self.net(x), self.net(x_rec), strict=True)):
            fa, fb = fa.float(), fb.float()  # eps 1e-10 underflows in fp16: 0/0 at all-zero ReLU features
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((fa - fb).pow(2) * getattr(self, f"lin{i}")).sum(1).mean()
        return total * self.scale


def random_feature_perceptual(in_channels: int = 3, channels: Sequence[int] = (32, 64, 128), seed: int = 0,
                              max_slices: int = 24) -> PerceptualLoss:
    """Default: a seeded random 2D conv net (conv3-ReLU ×2 per stage, max-pool between stages), weight 1."""
    cfg: list = []
    cuts, n = [], 0
    for i, c in enumerate(channels):
        if i:
            cfg.append("M")
            n += 1
        cfg += [c, c]
        n += 4
        cuts.append(n)
    features = _vgg_features(cfg, in_channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * 9
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                m.bias.zero_()
    return PerceptualLoss(SlicedFeatures(features, cuts), max_slices=max_slices)


def lpips_vgg16(vgg_weights: str | Path, lin_weights: str | Path, max_slices: int = 24,
                pumit_shift: bool = False) -> PerceptualLoss:
    """Real LPIPS-VGG16 from local files: torchvision ``vgg16`` state dict and LPIPS ``vgg.pth`` (``lin{i}.model.1``).

    ``pumit_shift=True`` reproduces the official tokenizer's flipped input shift (only for bit-compatibility).
    Result is ×2 like the official tokenizer's LPIPS.
    """
    features = _vgg_features(VGG16_CFG)
    try:
        sd = torch.load(vgg_weights, map_location="cpu", weights_only=True)
        lin_sd = torch.load(lin_weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{vgg_weights} / {lin_weights}: cannot read LPIPS weights ({exc})") from exc
    sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
    try:
        features.load_state_dict(sd)
        lin = [lin_sd[f"lin{i}.model.1.weight"].reshape(-1) for i in range(len(VGG16_CUTS))]
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"{vgg_weights} / {lin_weights}: not VGG16 / LPIPS weights ({exc})") from exc
    shift = tuple(-s for s in LPIPS_SHIFT) if pumit_shift else LPIPS_SHIFT
    return PerceptualLoss(SlicedFeatures(features, VGG16_CUTS), lin, scale=2.0, max_slices=max_slices,
                          shift=shift, norm_scale=LPIPS_SCALE)


def build_perceptual(spec: str | None = None, in_channels: int = 3, seed: int = 0) -> PerceptualLoss:
    """``None``/"random[:C1,C2,...]" -> random features; "lpips:VGG.pth,LIN.pth" -> real LPIPS from local files."""
    if not spec or spec == "random":
        return random_feature_perceptual(in_channels, seed=seed)
    if spec.startswith("random:"):
        try:
            chans = tuple(int(c) for c in spec.removeprefix("random:").split(","))
        except ValueError:
            chans = ()
        if not chans or min(chans) < 1:
            raise UserError(f"--perceptual {spec}: expected random:C1,C2,... (channels per stage)")
        return random_feature_perceptual(in_channels, chans, seed=seed)
    if spec.startswith("lpips:"):
        parts = spec.removeprefix("lpips:").split(",")
        if len(parts) != 2:
            raise UserError(f"--perceptual {spec}: expected lpips:VGG16_WEIGHTS,LPIPS_LIN_WEIGHTS")
        return lpips_vgg16(parts[0], parts[1])
    raise UserError(f"--perceptual {spec}: expected 'random[:C1,C2,...]' or 'lpips:VGG16_WEIGHTS,LPIPS_LIN_WEIGHTS'")

