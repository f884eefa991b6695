"""Architecture registry: ``model.json`` names an architecture and its arguments; this turns that into a module.

Bundles must never contain pickled code, so the architecture is always rebuilt from a name + JSON arguments.
Families register themselves here; heavy imports happen only when a model is built. A name registered twice is
almost always two families colliding (the second silently wins), so that warns; tests that need a toy
architecture use :func:`temporary_architecture` or ``register_architecture(name, replace=True)`` instead.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vocoslicer.errors import UserError

Builder = Callable[..., torch.nn.Module]
_REGISTRY: dict[str, Builder] = {}
# families whose modules register more architectures when imported (kept lazy: PUMIT pulls extra code)
_LAZY_MODULES = ("vocoslicer.models.pumit", "vocoslicer.models.classifier", "vocoslicer.models.nnunet")


def _describe(fn: Builder) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def register_architecture(name: str, *, replace: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(**args)`` available as architecture ``name``.

    Registering a different builder under a taken name warns (naming both builders) unless ``replace`` says the
    replacement is intended.
    """

    def deco(fn: Builder) -> Builder:
        old = _REGISTRY.get(name)
        if old is not None and old is not fn and not replace:
            warnings.warn(f"model architecture {name!r} registered twice: {_describe(fn)} replaces "
                          f"{_describe(old)}", RuntimeWarning, stacklevel=2)
        _REGISTRY[name] = fn
        return fn

    return deco


def unregister_architecture(name: str) -> Builder | None:
    """Forget architecture ``name``; returns its builder (``None`` when it was not registered)."""
    return _REGISTRY.pop(name, None)


@contextlib.contextmanager
def temporary_architecture(name: str, builder: Builder) -> Iterator[Builder]:
    """Make ``builder`` architecture ``name`` inside the block, then restore what was there (tests' toy models)."""
    previous = _REGISTRY.get(name)
    register_architecture(name, replace=True)(builder)
    try:
        yield builder
    finally:
        if previous is None:
            unregister_architecture(name)
        else:
            _REGISTRY[name] = previous


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
