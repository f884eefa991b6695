"""One pooled feature vector per case, for covering the cohort's feature space when choosing what to label.

For a SwinUNETR this is the VoCo embedding (voco_spec.md §2.1: global average pools of enc0, enc1, enc2, enc3 and
encoder10 on hidden state 4, concatenated: 24·feature_size values) of the segmentation network's own encoder,
averaged over the windows that tile the volume. Other architectures (the small MONAI UNet of the CPU benchmark)
have no VoCo encoder; for them the global average pools of every 3-D convolution's output are concatenated, the
same idea (multi-scale pooled activations) without the VoCo names. Windows do not overlap: a mean of pooled
features needs each voxel once, not the blending weights of segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _is_swin(net: torch.nn.Module) -> bool:
    return all(hasattr(net, n) for n in ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"))


def _conv_pools(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    pooled: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        pooled.append(out.float().mean(dim=(2, 3, 4)))

    handles = [m.register_forward_hook(hook) for m in net.modules() if type(m) is torch.nn.Conv3d]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    if not pooled:
        raise TypeError(f"{type(net).__name__} has no Conv3d layers to pool features from")
    return torch.cat(pooled, dim=1)


def pooled_features(model: torch.nn.Module, tensor: torch.Tensor, roi: Sequence[int],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, X, Y, Z) or (1, X, Y, Z) model-grid input → float32 (D,) feature vector on the CPU."""
    from vocoslicer.infer.sliding import _pad_to_roi, window_grid
    from vocoslicer.models.voco_head import swin_embedding

    dev = torch.device(device)
    img = tensor[0] if tensor.dim() == 5 else tensor
    img = _pad_to_roi(img.to(dev, torch.float32), roi)
    rx, ry, rz = (int(r) for r in roi)
    windows = window_grid(img.shape[-3:], (rx, ry, rz), 0.0)
    net = model.to(dev).eval()
    total: torch.Tensor | None = None
    with torch.inference_mode():
        for w in windows:
            x = img[None, :, w.x:w.x + rx, w.y:w.y + ry, w.z:w.z + rz]
            f = swin_embedding(net, x) if _is_swin(net) else _conv_pools(net, x)
            total = f[0].float() if total is None else total + f[0].float()
    assert total is not None
    return (total / len(windows)).cpu()
