"""PUMIT family: SAC, soft-token tokenizer, universal ViT with 3D RoPE, MIM, downstream adapters.

Importing this package registers the architectures ``pumit_vit`` (backbone bundle), ``pumit_tokenizer``,
``pumit_vit_cls`` and ``pumit_vit_seg`` with :mod:`vocoslicer.models.factory` (which imports it lazily).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vocoslicer.models.factory import register_architecture
from vocoslicer.models.pumit.adapters import PumitViTClassifier, PumitViTSegmenter, backbone_vit_args, load_backbone
from vocoslicer.models.pumit.tokenizer import PumitTokenizer, TokenizerConfig
from vocoslicer.models.pumit.vit import PumitViT, ViTConfig, vit_config

__all__ = ["PumitTokenizer", "PumitViT", "PumitViTClassifier", "PumitViTSegmenter", "TokenizerConfig", "ViTConfig",
           "backbone_vit_args", "load_backbone", "vit_config"]


@register_architecture("pumit_vit")
def _pumit_vit(**kwargs: Any) -> nn.Module:
    """The bare pre-trained backbone (task "backbone"): ``ViTConfig`` fields as arguments."""
    return PumitViT(ViTConfig(**kwargs))


@register_architecture("pumit_tokenizer")
def _pumit_tokenizer(**kwargs: Any) -> nn.Module:
    """The visual tokenizer (task "backbone"): ``TokenizerConfig`` fields as arguments."""
    return PumitTokenizer(TokenizerConfig(**kwargs))


@register_architecture("pumit_vit_cls")
def _pumit_vit_cls(**kwargs: Any) -> nn.Module:
    if "out_channels" in kwargs:  # bundles name the output count out_channels or num_classes
        kwargs.setdefault("num_classes", kwargs.pop("out_channels"))
    return PumitViTClassifier(**kwargs)


@register_architecture("pumit_vit_seg")
def _pumit_vit_seg(**kwargs: Any) -> nn.Module:
    return PumitViTSegmenter(**kwargs)
