"""Volume classification on the VoCo encoder: pooled encoder features → linear layer.

The encoder keeps SwinUNETR's module names (``swinViT``, ``encoder1-4``, ``encoder10``), so an official SSL
checkpoint or a segmentation bundle's encoder loads into it with the same name+shape rule as everywhere else.
``pool="deepest"`` averages the deepest stage (16·fs features, cheap: no full-resolution convolution);
``pool="voco"`` concatenates the five pooled maps VoCo's own contrastive head uses (24·fs features, spec §2.1);
``pool="decoder"`` is the official VoCo downstream classifier (voco_spec §6.2, CC-CCII ``model.py``): the whole
SwinUNETR-v2 encoder *and* decoder without the ``out`` block, global average pooling of the full-resolution decoder
output (fs features) and ``Linear(fs, classes)``. Its decoder keeps SwinUNETR's names (``decoder1-5``), so a
segmentation bundle's decoder loads as well. The official code also duplicates its fixed-depth input stacks along
depth (``cat([x, x], dim=2)``); that is a quirk of their pre-made 2D stacks, not done here (our whole-volume input
is resized to a fixed size that is already a multiple of 32).
"""

from __future__ import annotations

import torch
from torch import nn

from vocoslicer.models.factory import register_architecture
from vocoslicer.models.swin import build_swinunetr, feature_size_for

POOLS = ("deepest", "voco", "decoder")


class VoCoClassifier(nn.Module):
    """SwinUNETR-v2 encoder with global average pooling and a linear classification head."""

    def __init__(self, size: str | None = "B", feature_size: int | None = None, in_channels: int = 1,
                 num_classes: int = 2, patch_merging: str = "legacy", pool: str = "deepest", dropout: float = 0.0,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        fs = feature_size_for(size, feature_size)
        net = build_swinunetr(None, feature_size=fs, in_channels=in_channels, out_channels=2,
                              patch_merging=patch_merging, use_checkpoint=use_checkpoint)
        self.swinViT = net.swinViT
        self.encoder1, self.encoder2, self.encoder3 = net.encoder1, net.encoder2, net.encoder3
        self.encoder4, self.encoder10 = net.encoder4, net.encoder10
        if pool == "decoder":
            self.decoder5, self.decoder4, self.decoder3 = net.decoder5, net.decoder4, net.decoder3
            self.decoder2, self.decoder1 = net.decoder2, net.decoder1
        self.pool = pool
        self.num_classes = int(num_classes)
        self.dropout = nn.Dropout(float(dropout))
        dims = {"deepest": 16 * fs, "voco": 24 * fs, "decoder": fs}
        self.head = nn.Linear(dims[pool], self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (N, D)."""
        hidden = self.swinViT(x, normalize=True)
        if self.pool == "decoder":
            enc0, enc1 = self.encoder1(x), self.encoder2(hidden[0])
            enc2, enc3 = self.encoder3(hidden[1]), self.encoder4(hidden[2])
            dec = self.decoder5(self.encoder10(hidden[4]), hidden[3])
            dec = self.decoder2(self.decoder3(self.decoder4(dec, enc3), enc2), enc1)
            return self.decoder1(dec, enc0).mean(dim=(2, 3, 4))
        deepest = self.encoder10(hidden[4]).mean(dim=(2, 3, 4))
        if self.pool == "deepest":
            return deepest
        maps = [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2])]
        return torch.cat([m.mean(dim=(2, 3, 4)) for m in maps] + [deepest], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.dropout(self.features(x)))


@register_architecture("voco_classifier")
def _voco_classifier(**kwargs: object) -> nn.Module:
    return VoCoClassifier(**kwargs)  # type: ignore[arg-type]
