"""PUMIT universal ViT (spec §3): SAC patch embedding, EVA-02 blocks, additive 3D RoPE, [CLS], resampled pos-embed.

Parameter names follow EVA-02 / the official PUMIT checkpoints (``blocks.i.attn.q_proj``, ``mlp.w1``, ``ffn_ln``...)
so converted checkpoints load by name. Attention runs through ``F.scaled_dot_product_attention`` (flash /
memory-efficient kernels on GPU; the official code used xformers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vocoslicer.models.pumit.rope import Rope3D
from vocoslicer.models.pumit.sac import SacConv3d, adapt_in_channels, inflate_2d_kernel, reduce_depth_taps, resample


@dataclass
class ViTConfig:
    """ViT sizes. ``patch_depth=None`` = SAC patch embedding (pre-training); an int = fixed (pd, p, p) patch."""

    in_channels: int = 3
    patch_size: int = 16
    patch_depth: int | None = None
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 8 / 3
    pos_embed_shape: Sequence[int] = field(default_factory=lambda: (5, 10, 10))
    rope_bases: Sequence[float] = field(default_factory=lambda: (2333.0, 10000.0, 10000.0))
    eps: float = 1e-5
    grad_ckpt: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pos_embed_shape"], d["rope_bases"] = list(self.pos_embed_shape), list(self.rope_bases)
        return d


VIT_SIZES: dict[str, dict] = {
    "B": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "L": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "S": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2},
}


def vit_config(size: str = "B", **overrides) -> ViTConfig:
    """A named size (B, L, S, tiny) with overrides."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r} (choose from {', '.join(VIT_SIZES)})")
    return ViTConfig(**{**VIT_SIZES[size], **overrides})


class Attention(nn.Module):
    """EVA-02 sub-LN attention: separate q/k/v projections, bias on q and v only, RoPE on patch tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, length, c = x.shape
        heads = lambda t: t.view(n, length, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        # token 0 is [CLS]: no rotation
        q = torch.cat((q[:, :, :1], Rope3D.rotate(q[:, :, 1:], cos, sin)), 2)
        k = torch.cat((k[:, :, :1], Rope3D.rotate(k[:, :, 1:], cos, sin)), 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, c))


class SwiGLU(nn.Module):
    """w3(LN(SiLU(w1 x) * w2 x)): EVA-02's SwiGLU with sub-LN."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    """Pre-LN residual block, no layer-scale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """SAC patch embedding (k = s = patch) or a fixed (pd, p, p) conv for fine-tuning at one spacing."""

    def __init__(self, in_channels: int, dim: int, patch: int, patch_depth: int | None) -> None:
        super().__init__()
        self.adaptive = patch_depth is None
        if self.adaptive:
            self.proj: nn.Module = SacConv3d(in_channels, dim, patch, patch)
        else:
            self.proj = nn.Conv3d(in_channels, dim, (patch_depth, patch, patch), (patch_depth, patch, patch))

    def forward(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:  # type: ignore[override]
        if self.adaptive:
            return self.proj(x, aniso_d, 0)[0]
        return self.proj(x)


class PumitViT(nn.Module):
    """``forward(x, aniso_d)`` -> final-normed tokens (N, 1 + L, C), [CLS] first; L = flattened (d, h, w) grid."""

    def __init__(self, cfg: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = cfg or ViTConfig()
        if overrides:
            cfg = ViTConfig(**{**cfg.to_dict(), **overrides})
        self.cfg = cfg
        dim = cfg.embed_dim
        if dim % cfg.num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        self.patch_embed = PatchEmbed(cfg.in_channels, dim, cfg.patch_size, cfg.patch_depth)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *cfg.pos_embed_shape))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.rope = Rope3D(dim // cfg.num_heads, cfg.rope_bases)
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.cls_token.register_hook(dense_grad)
        self.apply(_init_weights)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def embed(self, x: torch.Tensor, aniso_d: int = 0) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch tokens + resampled abs pos-embed, (N, L, C), and the token grid (d, h, w)."""
        x = self.patch_embed(x, aniso_d)
        grid = tuple(x.shape[2:])
        x = x + resample(self.pos_embed.float(), grid).to(x.dtype)
        return x.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]

    def run_block(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.cfg.grad_ckpt and self.training and torch.is_grad_enabled():
            return checkpoint(self.blocks[i], x, cos, sin, use_reentrant=False)
        return self.blocks[i](x, cos, sin)

    def with_cls(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), 1)

    def forward_features(self, x: torch.Tensor, aniso_d: int = 0) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
        """Every block's output (pre-final-norm, [CLS] included) and the token grid."""
        tokens, grid = self.embed(x, aniso_d)
        cos, sin = self.rope.tables(grid)
        h = self.with_cls(tokens)
        outs = []
        for i in range(len(self.blocks)):
            h = self.run_block(i, h, cos, sin)
            outs.append(h)
        return outs, grid

    def forward(self, x: torch.Tensor, aniso_d: int = 0) -> torch.Tensor:  # type: ignore[override]
        outs, _ = self.forward_features(x, aniso_d)
        return self.norm(outs[-1])


def dense_grad(grad: torch.Tensor) -> torch.Tensor:
    """Give an expanded token's gradient standard strides (DDP warns about, and copies, odd-strided grads)."""
    if grad.stride() == torch.empty(grad.shape, device="meta").stride():
        return grad
    return grad.clone(memory_format=torch.contiguous_format)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "mask_token", "q_bias", "v_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms (1-D params), embeddings and tokens (official recipe)."""
    decay, no_decay = [], []
    no_decay_modules = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if p.ndim <= 1 or name.split(".")[-1] in NO_WEIGHT_DECAY or module in no_decay_modules:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adapt_vit_state_dict(sd: dict[str, torch.Tensor], model: PumitViT) -> dict[str, torch.Tensor]:
    """Convert a PUMIT or EVA-02 ViT state dict to ``model``'s geometry (spec §7.2).

    PUMIT: drops RoPE tables, sums the 16-deep SAC patch kernel down to a fixed patch depth, adapts input channels
    (Σ_c w / C_new), resamples the pos-embed grid. EVA-02 (2D): the 14×14 patch kernel is resized bicubically and
    spread evenly over the patch depth, the (1, 1 + g², C) pos-embed becomes a g×g grid repeated over depth and
    resampled, and its [CLS] slot is added to ``cls_token``. Keys not in the model are dropped.
    """
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    cls_pos = None
    for key, value in sd.items():
        key = key.removeprefix("module.").removeprefix("model.").removeprefix("backbone.")
        if key not in target or "rope" in key:
            continue
        want = target[key]
        value = value.float()
        if key == "patch_embed.proj.weight":
            if value.dim() == 4:  # EVA-02 2D kernel
                value = F.interpolate(value, size=tuple(want.shape[3:]), mode="bicubic", align_corners=False)
                value = inflate_2d_kernel(value, want.shape[2])
            if value.shape[2] != want.shape[2]:
                value = reduce_depth_taps(value, want.shape[2])
            value = adapt_in_channels(value, want.shape[1])
        elif key == "pos_embed" and value.dim() == 3:  # EVA-02 (1, 1 + g*g, C)
            g = math.isqrt(value.shape[1] - 1)
            if g * g != value.shape[1] - 1:
                raise ValueError(f"pos_embed: {value.shape[1] - 1} patch positions are not a square grid")
            cls_pos = value[:, :1]
            grid = value[:, 1:].transpose(1, 2).reshape(1, -1, 1, g, g)
            value = resample(grid, tuple(want.shape[2:]))
        elif key == "pos_embed" and value.shape != want.shape:
            value = resample(value, tuple(want.shape[2:]))
        if value.shape != want.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit {tuple(want.shape)}")
        out[key] = value.to(want.dtype)
    if cls_pos is not None and "cls_token" in out:
        out["cls_token"] = out["cls_token"] + cls_pos.to(out["cls_token"].dtype)
    return out
