"""Downstream models on a PUMIT ViT backbone (spec §5): [CLS] classifier, and ViT + UNet decoder segmenter.

Both use a *fixed* patch (patch_depth, 16, 16), as the official downstream code does: the 16-deep SAC kernel of
the pre-trained backbone is summed down to ``patch_depth`` on load (:func:`load_backbone`).
``aniso = log2(16 / patch_depth)`` plays the role of the DA: a feature level at in-plane scale 1/2^j is
down-sampled in depth by 2^max(j − aniso, 0), which reproduces the official simple-FPN/decoder depth
factors (and generalises the hard-coded (1, 2, 2) stem).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vocoslicer.models.pumit.vit import PumitViT, ViTConfig, adapt_vit_state_dict, vit_config

OUT_INDEXES = {"B": (3, 5, 7, 11), "L": (7, 11, 15, 23), "S": (3, 5, 7, 11), "tiny": (0, 1, 1, 1)}
DEEP_SUPERVISION_WEIGHTS = tuple(w / 1.875 for w in (1.0, 0.5, 0.25, 0.125))


def _backbone_config(size: str, in_channels: int, patch_depth: int, pos_embed_shape: Sequence[int],
                     vit_args: dict | None) -> ViTConfig:
    if patch_depth < 1 or 16 % patch_depth:
        raise ValueError(f"patch_depth must divide 16, got {patch_depth}")
    return vit_config(size, in_channels=in_channels, patch_depth=patch_depth, pos_embed_shape=tuple(pos_embed_shape),
                      **(vit_args or {}))


BACKBONE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "rope_bases", "eps")


def backbone_vit_args(arch_args: dict) -> dict:
    """``vit_args`` for the adapters from a ``pumit_vit`` backbone bundle's architecture args (model width/depth;
    input channels, patch depth and pos-embed grid stay the downstream model's own choice)."""
    return {k: arch_args[k] for k in BACKBONE_KEYS if k in arch_args}


def load_backbone(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load pre-trained ViT weights (a PUMIT backbone bundle / MIM checkpoint) into ``model.vit``.

    Patch kernel depth, input channels and pos-embed grid are converted (spec §7.2). Returns (missing, unexpected)
    keys of the ViT; heads and decoders stay freshly initialised.
    """
    vit: PumitViT = model.vit if hasattr(model, "vit") else model  # type: ignore[assignment]
    sd = {k.removeprefix("vit."): v for k, v in state_dict.items()}
    result = vit.load_state_dict(adapt_vit_state_dict(sd, vit), strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


class PumitViTClassifier(nn.Module):
    """logits = Linear(final-normed [CLS]). ``forward(x)`` with x (N, C, D, H, W)."""

    def __init__(self, num_classes: int, in_channels: int = 3, size: str = "B", patch_depth: int = 16,
                 pos_embed_shape: Sequence[int] = (10, 10, 10), vit_args: dict | None = None) -> None:
        super().__init__()
        self.vit = PumitViT(_backbone_config(size, in_channels, patch_depth, pos_embed_shape, vit_args))
        self.head = nn.Linear(self.vit.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head(self.vit(x)[:, 0])


def _depth(j: int, aniso: int) -> int:
    """Depth factor (1 or 2) of a ×2 step between in-plane levels j − 1 and j."""
    return 2 if j > aniso else 1


def _convt(c_in: int, c_out: int, j: int, aniso: int) -> nn.ConvTranspose3d:
    s = (_depth(j, aniso), 2, 2)
    return nn.ConvTranspose3d(c_in, c_out, s, s)


def _conv_in(c_in: int, c_out: int, j: int, aniso: int, stride: int = 1, act: bool = True) -> list[nn.Module]:
    kd = 3 if j >= aniso else 1  # 3x3x3 only once the level is isotropic (SAC's rule); else 1x3x3
    sd = _depth(j, aniso) if stride == 2 else 1
    layers: list[nn.Module] = [nn.Conv3d(c_in, c_out, (kd, 3, 3), (sd, stride, stride), (kd // 2, 1, 1)),
                               nn.InstanceNorm3d(c_out, affine=True)]
    return layers + [nn.LeakyReLU(0.01)] if act else layers


class _UpLayer(nn.Module):
    """ConvT ×2 -> concat skip -> conv3-IN-LReLU -> conv3-IN -> LReLU (plain UNet block, no residual)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, j: int, aniso: int) -> None:
        super().__init__()
        self.up = _convt(c_in, c_out, j, aniso)
        self.conv = nn.Sequential(*_conv_in(c_out + c_skip, c_out, j - 1, aniso),
                                  *_conv_in(c_out, c_out, j - 1, aniso, act=False), nn.LeakyReLU(0.01))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.conv(torch.cat((self.up(x), skip), 1))


class PumitViTSegmenter(nn.Module):
    """ViT -> 4-scale simple FPN (1/4 .. 1/32) -> UNet decoder + full-resolution stem -> logits at input size.

    Input shape must be a multiple of (patch_depth * 2^[aniso < 5], 32, 32) so that the 1/32 level exists.
    ``forward`` returns full-resolution logits; :meth:`forward_deep` also returns the ½, ¼ and ⅛ heads for deep
    supervision (weights :data:`DEEP_SUPERVISION_WEIGHTS`).
    """

    def __init__(self, out_channels: int, in_channels: int = 1, size: str = "B", patch_depth: int = 4,
                 pos_embed_shape: Sequence[int] = (12, 12, 12), out_indexes: Sequence[int] | None = None,
                 decoder_channels: Sequence[int] = (128, 256, 512, 512), stem_channels: Sequence[int] = (32, 64),
                 vit_args: dict | None = None) -> None:
        super().__init__()
        self.vit = PumitViT(_backbone_config(size, in_channels, patch_depth, pos_embed_shape, vit_args))
        self.out_indexes = tuple(out_indexes or OUT_INDEXES.get(size, OUT_INDEXES["B"]))
        if len(self.out_indexes) != 4 or max(self.out_indexes) >= len(self.vit.blocks):
            raise ValueError(f"out_indexes must name 4 blocks < {len(self.vit.blocks)}")
        a = self.aniso = (16 // patch_depth).bit_length() - 1
        c = self.vit.embed_dim
        dc, sc = list(decoder_channels), list(stem_channels)
        self.fpn_norms = nn.ModuleList(nn.InstanceNorm3d(c, affine=True) for _ in range(4))
        self.fpn = nn.ModuleList([
            nn.Sequential(_convt(c, c, 4, a), nn.InstanceNorm3d(c, affine=True), nn.GELU(), _convt(c, c, 3, a)),
            _convt(c, c, 4, a),
            nn.Identity(),
            nn.MaxPool3d((_depth(5, a), 2, 2)),
        ])
        self.laterals = nn.ModuleList(nn.Sequential(nn.Conv3d(c, ch, 1), nn.InstanceNorm3d(ch, affine=True),
                                                    nn.LeakyReLU(0.01)) for ch in dc)
        # 1/32 -> 1/16 -> 1/8 -> 1/4
        self.up = nn.ModuleList([_UpLayer(dc[3], dc[2], dc[2], 5, a), _UpLayer(dc[2], dc[1], dc[1], 4, a),
                                 _UpLayer(dc[1], dc[0], dc[0], 3, a)])
        self.stem_full = nn.Sequential(*_conv_in(in_channels, sc[0], 0, a))
        self.stem_half = nn.Sequential(*_conv_in(sc[0], sc[1], 1, a, stride=2))
        self.up_half = _UpLayer(dc[0], sc[1], sc[1], 2, a)
        self.up_full = _UpLayer(sc[1], sc[0], sc[0], 1, a)
        self.heads = nn.ModuleList(nn.Conv3d(ch, out_channels, 1) for ch in (sc[0], sc[1], dc[0], dc[1]))

    def forward_deep(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits at full, ½, ¼ and ⅛ in-plane resolution (the first is the prediction)."""
        outs, grid = self.vit.forward_features(x)
        n = x.shape[0]
        feats = []
        for k, idx in enumerate(self.out_indexes):
            f = outs[idx][:, 1:].transpose(1, 2).reshape(n, -1, *grid)
            feats.append(self.laterals[k](self.fpn[k](self.fpn_norms[k](f))))
        h = feats[3]
        h = self.up[0](h, feats[2])
        h8 = self.up[1](h, feats[1])
        h4 = self.up[2](h8, feats[0])
        s1 = self.stem_full(x)
        s2 = self.stem_half(s1)
        h2 = self.up_half(h4, s2)
        h1 = self.up_full(h2, s1)
        return [self.heads[0](h1), self.heads[1](h2), self.heads[2](h4), self.heads[3](h8)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_deep(x)[0]
