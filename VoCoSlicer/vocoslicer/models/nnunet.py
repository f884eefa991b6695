"""The official nnU-Net VoComni model (``VoComni_nnunet.pt``, 31M parameters) behind the ordinary bundle format.

The network is ``PlainConvUNet`` from ``dynamic-network-architectures`` (the package nnU-Net builds its networks
with), configured from the official plans (../shared/reference/vocomni_nnunet.md): 6 stages, 32..320 features,
strides [1,1,1],[2,2,2]x4,[1,2,2] in (z, y, x). Everything nnU-Net does differently from the SwinUNETR models is
expressed in the bundle, so ``segment``, the worker, batch mode and finetuning use it unchanged:

- spacing 1.5 × 0.78125 × 0.782 mm (z, y, x) → the bundle's (x, y, z) spacing;
- CTNormalization (clip to the 0.5/99.5 percentiles, then (x − mean) / std with the fingerprint's exact, odd
  std of 120748.45) is a linear map with clipping, i.e. exactly the bundle's intensity window with
  ``b_min = (lo − mean) / std`` and ``b_max = (hi − mean) / std``;
- patch 80 × 160 × 160 (z, y, x), Gaussian blending with sigma 1/8 and step 0.5: the bundle's sliding window;
- axis order: the engine feeds (X, Y, Z) in RAS; nnU-Net saw SimpleITK (z, y, x) arrays, which for the usual
  identity-direction CT is LPS. :class:`VoComniNnunet` flips X and Y and transposes, and back on the way out;
- optional mirroring TTA (``mirror``): the mean of the logits over all 8 flips, as nnU-Net's predictor does.

Known deviation: the engine resamples the image linearly, nnU-Net with order 3 in-plane.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vocoslicer.errors import UserError
from vocoslicer.models.factory import register_architecture

NNUNET_ARCH = "vocomni_nnunet"
FEATURES = (32, 64, 128, 256, 320, 320)
STRIDES_ZYX = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))  # the plans', not the helper's
SPACING_ZYX = (1.5, 0.78125, 0.7820000052)
PATCH_ZYX = (80, 160, 160)
CT_NORMALIZATION = {"lower": -1018.0, "upper": 288.9906005859375, "mean": 100.26440509616958,
                    "std": 120748.45499804732}
_LAST_SEG = "decoder.seg_layers.{}.weight"


def ct_normalization_window(norm: Mapping[str, float] = CT_NORMALIZATION) -> dict[str, Any]:
    """nnU-Net's CTNormalization written as the bundle's clipped linear intensity window (identical maths)."""
    lo, hi, mean, std = (float(norm[k]) for k in ("lower", "upper", "mean", "std"))
    std = max(std, 1e-8)
    return {"a_min": lo, "a_max": hi, "b_min": (lo - mean) / std, "b_max": (hi - mean) / std, "clip": True}


def bundle_preprocessing() -> dict[str, Any]:
    """The ``preprocessing`` block of a VoComni_nnunet bundle."""
    return {"orientation": "RAS", "spacing": list(reversed(SPACING_ZYX)), "intensity": ct_normalization_window(),
            "pad_value": -1024, "scheme": "nnunet-CTNormalization", "ct_normalization": dict(CT_NORMALIZATION)}


def bundle_inference() -> dict[str, Any]:
    """The ``inference`` block: the plans' patch in the engine's (X, Y, Z) order, Gaussian blending, step 0.5."""
    return {"roi_size": list(reversed(PATCH_ZYX)), "overlap": 0.5, "mode": "gaussian", "sw_batch_size": 2}


_CLASS: type | None = None


def nnunet_class() -> type:
    """:class:`VoComniNnunet`, built on first use so that this module imports without the optional package."""
    global _CLASS
    if _CLASS is None:
        try:
            from dynamic_network_architectures.architectures.unet import PlainConvUNet
        except ImportError:
            raise UserError("the nnU-Net VoComni model needs the package dynamic-network-architectures "
                            "(pip install dynamic-network-architectures)") from None

        class VoComniNnunet(PlainConvUNet):
            """The plans' PlainConvUNet (state dict keys are nnU-Net's own), fed (z, y, x) LPS arrays like nnU-Net."""

            def __init__(self, in_channels: int = 1, out_channels: int = 21, features: Sequence[int] = FEATURES,
                         strides: Sequence[Sequence[int]] = STRIDES_ZYX, mirror: bool = False) -> None:
                super().__init__(
                    int(in_channels), len(features), [int(f) for f in features], torch.nn.Conv3d, 3,
                    [[int(s) for s in st] for st in strides], [2] * len(features), int(out_channels),
                    [2] * (len(features) - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                    norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                    nonlin_kwargs={"inplace": True}, deep_supervision=False)
                self.mirror = bool(mirror)
                total = torch.tensor([[int(s) for s in st] for st in strides]).prod(0)
                self.divisor = tuple(int(d) for d in total)  # (z, y, x) size multiple the network needs

            def _aliases(self) -> dict[str, str]:
                """alias key → canonical key: PlainConvUNet registers each conv/norm twice (``all_modules.N``)
                and the decoder holds the encoder (``decoder.encoder.*``), so its state dict names every tensor
                2-4 times. Bundles store each tensor once (safetensors refuses shared storage)."""
                full = super().state_dict(keep_vars=True)
                first: dict[int, str] = {}
                out: dict[str, str] = {}
                for key in sorted(full, key=lambda k: ("all_modules." in k, k.startswith("decoder.encoder."), k)):
                    ptr = id(full[key])  # the same Parameter object; data_ptr() is 0 for every tensor on meta
                    if ptr in first:
                        out[key] = first[ptr]
                    else:
                        first[ptr] = key
                return out

            def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
                """Every tensor once, under its canonical nnU-Net name (``conv``/``norm``, ``encoder.*``)."""
                sd = super().state_dict(*args, **kwargs)
                for alias in self._aliases():
                    sd.pop(kwargs.get("prefix", "") + alias, None)
                return sd

            def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
                                ) -> Any:
                """Accept a state dict with or without the aliases (nnU-Net's own files have them)."""
                full = dict(state_dict)
                for alias, canonical in self._aliases().items():
                    if alias not in full and canonical in full:
                        full[alias] = full[canonical]
                return super().load_state_dict(full, strict=strict, assign=assign)

            def _run(self, z: torch.Tensor) -> torch.Tensor:
                size = z.shape[2:]
                pad = [(-s) % d for s, d in zip(size, self.divisor, strict=True)]
                if any(pad):  # e.g. the whole-volume window of --fast: pad to the strides' multiple, crop back
                    z = F.pad(z, [p for q in reversed(pad) for p in (0, q)])
                out = super().forward(z)
                return out[:, :, : size[0], : size[1], : size[2]]

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                """(B, C, X, Y, Z) RAS → logits in the same layout."""
                z = x.flip(2, 3).permute(0, 1, 4, 3, 2)  # RAS (X, Y, Z) → LPS (Z, Y, X)
                out = self._run(z)
                if self.mirror:
                    combos = [c for r in (1, 2, 3) for c in itertools.combinations((2, 3, 4), r)]
                    for axes in combos:
                        out = out + torch.flip(self._run(torch.flip(z, axes)), axes)
                    out = out / (len(combos) + 1)
                return out.permute(0, 1, 4, 3, 2).flip(2, 3)

        _CLASS = VoComniNnunet
    return _CLASS


@register_architecture(NNUNET_ARCH)
def _build(**kwargs: Any) -> torch.nn.Module:
    return nnunet_class()(**kwargs)


def looks_like_nnunet(state: Mapping[str, Any]) -> bool:
    """True for a (selected, renamed) state dict with nnU-Net's PlainConvUNet key names."""
    return any(k.startswith("encoder.stages.") for k in state) and any(k.startswith("decoder.seg_layers.")
                                                                       for k in state)


def infer_args(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture arguments read off the tensors: input channels, class count and features per stage."""
    n_seg = sum(1 for k in state if k.startswith("decoder.seg_layers.") and k.endswith(".weight"))
    last = state.get(_LAST_SEG.format(n_seg - 1))
    first = state.get("encoder.stages.0.0.convs.0.conv.weight")
    if last is None or first is None:
        raise UserError("not an nnU-Net PlainConvUNet checkpoint (no first encoder conv / last seg layer)")
    features = [int(state[f"encoder.stages.{i}.0.convs.0.conv.weight"].shape[0]) for i in range(n_seg + 1)
                if f"encoder.stages.{i}.0.convs.0.conv.weight" in state]
    args: dict[str, Any] = {"in_channels": int(first.shape[1]), "out_channels": int(last.shape[0])}
    if tuple(features) != FEATURES:
        args["features"] = features
    return args


def checkpoint_to_bundle(raw: Any, src: Path, out_dir: str | Path, entry: Any = None, model_id: str | None = None,
                         version: str | None = None, labels: Any = None, source_sha256: str | None = None,
                         sha256_verified: bool = False, overwrite: bool = False) -> tuple[Any, Any]:
    """An official nnU-Net checkpoint (flat, ``network_weights`` or ``state_dict`` layout) → a bundle.

    Every tensor of the network must be present with its shape: a partial nnU-Net checkpoint is refused. The
    bundle's ``source.inferred`` records what was read off the tensors rather than known (layout, class count).
    """
    from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
    from vocoslicer.models.catalog import label_table
    from vocoslicer.models.checkpoints import official_state_dict, prepare_official

    labels_given = labels is not None
    sd, _, _ = official_state_dict(raw, str(src))
    # the catalog's class count is itself inferred: the tensors win over it
    args = {**(dict(entry.architecture.get("args", {})) if entry is not None else {}), **infer_args(sd)}
    net = nnunet_class()(**args)
    target, aliases = net.state_dict(), set(net._aliases())
    matched, report = prepare_official(raw, target, str(src))
    report.unexpected = [k for k in report.unexpected if k not in aliases]  # the same tensors under a second name
    if report.missing or report.mismatched:
        raise UserError(f"{src}: incomplete nnU-Net checkpoint: {report.summary()}")
    n_out = int(args["out_channels"])
    if labels is None:
        name = {21: "vocomni", 14: "btcv"}.get(n_out) or (entry.labels if entry is not None else None)
        if name is None:
            raise UserError(f"{src}: {n_out} output channels; give a labels CSV (--labels) with {n_out - 1} labels")
        labels = label_table(name)
    if len(labels) + 1 != n_out:
        raise UserError(f"{src}: the network has {n_out} output channels but the label table has {len(labels)} "
                        "labels (+ background)")
    labels_source = "given" if labels_given else (entry.labels if entry is not None and entry.labels
                                                  else f"{n_out} classes")
    mid = model_id or (entry.id if entry is not None else src.name.split(".")[0].lower().replace("_", "-"))
    meta = new_bundle_meta(mid, version or (entry.version if entry is not None else "1.0.0"), "segmentation",
                           NNUNET_ARCH, args, preprocessing=bundle_preprocessing(), inference=bundle_inference(),
                           channel_values=list(range(n_out)))
    if entry is not None:
        meta.update(title=entry.title, description=entry.description, licence=entry.licence,
                    licence_url=entry.licence_url, citation=entry.citation)
    meta["source"] = {"file": src.name, "url": entry.url if entry is not None else None, "sha256": source_sha256,
                      "sha256_verified": bool(sha256_verified), "load_report": report.to_dict(),
                      "inferred": {"layout": report.container or "flat", "out_channels": n_out,
                                   "labels": labels_source}}
    bundle = ModelBundle(meta=meta, labels=labels)
    bundle.save(out_dir, matched, overwrite=overwrite)
    return bundle, report
