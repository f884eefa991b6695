"""Architecture registry: ``model.json`` names an architecture and its arguments; this turns that into a module.

Bundles must never contain pickled code, so the architecture is always rebuilt from a name + JSON arguments.
Families register themselves here; heavy imports happen only when a model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from vocoslicer.errors import UserError

Builder = Callable[..., torch.nn.Module]
_REGISTRY: dict[str, Builder] = {}
# families whose modules register more architectures when imported (kept lazy: PUMIT pulls extra code)
_LAZY_MODULES = ("vocoslicer.models.pumit", "vocoslicer.models.classifier", "vocoslicer.models.nnunet")


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(**args)`` available as architecture ``name``."""

    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_lazy() -> None:
    for mod in _LAZY_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def architectures() -> list[str]:
    """Names of every known architecture."""
    _load_lazy()
    return sorted(_REGISTRY)


def build_model(name: str, args: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build architecture ``name`` with JSON ``args``; bad names/args are user errors (bundles are user input)."""
    if name not in _REGISTRY:
        _load_lazy()
    if name not in _REGISTRY:
        raise UserError(f"unknown model architecture {name!r} (known: {', '.join(architectures())})")
    try:
        return _REGISTRY[name](**(args or {}))
    except TypeError as exc:
        raise UserError(f"bad arguments for architecture {name!r}: {exc}") from None


@register_architecture("swinunetr")
def _swinunetr(**kwargs: Any) -> torch.nn.Module:
    from vocoslicer.models.swin import build_swinunetr

    return build_swinunetr(**kwargs)


@register_architecture("unet")
def _unet(in_channels: int = 1, out_channels: int = 2, channels: list[int] | tuple[int, ...] = (16, 32, 64, 128),
          strides: list[int] | tuple[int, ...] = (2, 2, 2), num_res_units: int = 2, norm: str = "instance",
          dropout: float = 0.0) -> torch.nn.Module:
    """MONAI's residual 3-D UNet, so that bundles of a plain MONAI UNet (e.g. trained elsewhere, or the small
    models of the CPU tests and benchmarks) can be segmented with and finetuned like VoCo's SwinUNETR."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=int(in_channels), out_channels=int(out_channels),
                channels=tuple(int(c) for c in channels), strides=tuple(int(s) for s in strides),
                num_res_units=int(num_res_units), norm=norm, dropout=float(dropout))
