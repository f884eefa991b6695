"""VoCo backbones: MONAI SwinUNETR-v2 with the official VoCo arguments and the MONAI <= 1.4 patch merging.

The released VoCo weights were trained with MONAI 1.3, whose 3-D ``PatchMerging`` concatenates the 2x2x2
neighbours in a different (and partly duplicated) order than MONAI >= 1.5. The parameter names and shapes are
identical, so loading succeeds either way, but only the legacy order makes the official weights compute what
they were trained to compute (voco_spec.md §5.4). ``patch_merging="legacy"`` is therefore the default for every
VoCo model; ``"monai"`` keeps the current MONAI behaviour for models trained from scratch with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMergingV2

VOCO_SIZES: dict[str, int] = {"B": 48, "L": 96, "H": 192}
"""VoCo model size -> SwinUNETR ``feature_size`` (all other arguments are shared)."""

VOCO_ARGS: dict[str, object] = {
    "use_v2": True,
    "depths": (2, 2, 2, 2),
    "num_heads": (3, 6, 12, 24),
    "window_size": 7,
    "patch_size": 2,
}
"""SwinUNETR arguments of every official VoCo backbone (voco_spec.md §0, §2.1)."""

PATCH_MERGING_MODES = ("legacy", "monai")

# (d, h, w) offsets of the eight concatenated sub-grids in MONAI <= 1.4 (spec §5.4): (0,1,0) and (0,0,1) appear
# twice and (1,1,0), (0,1,1) are never used. Kept as data so the test can pin it.
LEGACY_MERGE_ORDER: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1),
)


class LegacyPatchMerging(PatchMergingV2):
    """3-D patch merging exactly as MONAI <= 1.4 computed it (the function the VoCo weights were trained with).

    Same parameters as MONAI's ``PatchMerging`` (``norm`` over 8C, ``reduction`` 8C -> 2C), so state dicts are
    interchangeable; only the 5-D forward differs. 2-D input keeps MONAI's behaviour.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented on the class
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in LEGACY_MERGE_ORDER], -1)
        return self.reduction(self.norm(x))


def feature_size_for(size: str | None, feature_size: int | None) -> int:
    """Resolve the SwinUNETR feature size from a VoCo size letter or an explicit value (explicit wins)."""
    if feature_size is not None:
        if feature_size <= 0 or feature_size % 12:
            raise ValueError(f"feature_size must be a positive multiple of 12, got {feature_size}")
        return int(feature_size)
    if size is None:
        raise ValueError("give a VoCo size (B, L, H) or a feature_size")
    key = str(size).upper()
    if key not in VOCO_SIZES:
        raise ValueError(f"unknown VoCo size {size!r}; choose one of {', '.join(VOCO_SIZES)}")
    return VOCO_SIZES[key]


def build_swinunetr(size: str | None = "B", feature_size: int | None = None, in_channels: int = 1,
                    out_channels: int = 14, patch_merging: str = "legacy", use_checkpoint: bool = False,
                    dropout_path_rate: float = 0.0, use_flash_attention: bool = False) -> SwinUNETR:
    """Build a SwinUNETR-v2 with the official VoCo arguments.

    ``size`` picks the VoCo variant (B=48, L=96, H=192 features); ``feature_size`` overrides it (tiny test models
    use 12). ``use_flash_attention`` switches MONAI's windowed attention to ``scaled_dot_product_attention``
    under ``no_grad``/``inference_mode`` (same weights, faster inference); training keeps the plain path.
    """
    if patch_merging not in PATCH_MERGING_MODES:
        raise ValueError(f"patch_merging must be one of {PATCH_MERGING_MODES}, got {patch_merging!r}")
    fs = feature_size_for(size, feature_size)
    downsample: object = LegacyPatchMerging if patch_merging == "legacy" else "merging"
    extra: dict[str, object] = {}
    if use_flash_attention:  # MONAI >= 1.5 only; leaving it out keeps older MONAI working
        extra["use_flash_attention"] = True
    return SwinUNETR(
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        feature_size=fs,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        dropout_path_rate=float(dropout_path_rate),
        use_checkpoint=bool(use_checkpoint),
        downsample=downsample,  # type: ignore[arg-type]
        **VOCO_ARGS,  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
    )
