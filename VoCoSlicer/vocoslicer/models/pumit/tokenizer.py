"""PUMIT universal visual tokenizer (the paper's ``SimpleVQTokenizer`` with a soft quantiser), spec §2.1-§2.2.

Plain SAC conv encoder (strides start_stride, 2, 2, ...; LayerNorm + GELU; two conv3-GroupNorm-LeakyReLU),
a K x D codebook read out as *soft tokens* (expectation over the codebook), and a mirrored transposed-conv decoder
with a linear 3-channel output in [-1, 1] space. All convs are SAC, so one set of weights serves any spacing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vocoslicer.models.pumit.sac import LayerNormNd, SacConv3d, SacSequential, SacTransposedConv3d, SacUpsample
from vocoslicer.ssl.pumit import soft_tokens


@dataclass
class TokenizerConfig:
    """Sizes of the tokenizer; the defaults are the paper model (K = 1024, D = 512, stride 16)."""

    in_channels: int = 3
    start_stride: int = 4
    channels: Sequence[int] = field(default_factory=lambda: (128, 256, 512))
    codebook_size: int = 1024
    embed_dim: int = 512
    groups: int = 8

    @property
    def stride(self) -> int:
        """Total in-plane down-sampling (must equal the ViT patch size for MIM)."""
        return self.start_stride * 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


TOKENIZER_SIZES: dict[str, dict] = {
    "paper": {},
    "small": {"channels": (64, 128, 256), "codebook_size": 1024, "embed_dim": 256},
    "tiny": {"channels": (8, 16, 16), "codebook_size": 32, "embed_dim": 16, "groups": 4},
}


def _conv_gn_act(c_in: int, c_out: int, groups: int) -> list[nn.Module]:
    return [SacConv3d(c_in, c_out, 3, 1, 1), nn.GroupNorm(min(groups, c_out), c_out), nn.LeakyReLU(0.01)]


class SoftQuantizer(nn.Module):
    """Linear logits over a K-entry codebook; the decoder input is the expected codebook vector."""

    def __init__(self, in_features: int, codebook_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, codebook_size)
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``z`` (N, C, D, H, W) -> logits/q (N, D, H, W, K) and z_q (N, E, D, H, W)."""
        logits = self.proj(z.movedim(1, -1))
        q, e = soft_tokens(logits, self.embedding.weight)
        return {"logits": logits, "q": q, "z_q": e.movedim(-1, 1)}


class PumitTokenizer(nn.Module):
    """Encoder -> soft quantiser -> decoder. ``forward(x, aniso_d)`` with x in [-1, 1], (N, C, D, H, W)."""

    def __init__(self, cfg: TokenizerConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = cfg or TokenizerConfig()
        if overrides:
            cfg = TokenizerConfig(**{**cfg.to_dict(), **overrides})
        self.cfg = cfg
        ch, g = list(cfg.channels), cfg.groups
        enc: list[nn.Module] = [SacConv3d(cfg.in_channels, ch[0], cfg.start_stride, cfg.start_stride),
                                LayerNormNd(ch[0]), nn.GELU()]
        for c_prev, c in zip(ch[:-1], ch[1:], strict=True):
            enc += [SacConv3d(c_prev, c, 2, 2), LayerNormNd(c), nn.GELU()]
        enc += _conv_gn_act(ch[-1], ch[-1], g) + _conv_gn_act(ch[-1], ch[-1], g)
        self.encoder = SacSequential(*enc)
        self.quantize = SoftQuantizer(ch[-1], cfg.codebook_size, cfg.embed_dim)
        dec: list[nn.Module] = _conv_gn_act(cfg.embed_dim, ch[-1], g) + _conv_gn_act(ch[-1], ch[-1], g)
        for c_prev, c in zip(ch[::-1][:-1], ch[::-1][1:], strict=True):
            dec.append(SacUpsample(c_prev, c, g))
        dec.append(SacTransposedConv3d(ch[0], cfg.in_channels, cfg.start_stride))
        self.decoder = SacSequential(*dec)

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def tokenize(self, x: torch.Tensor, aniso_d: int) -> dict[str, torch.Tensor]:
        """Encoder + quantiser (what MIM needs): logits, q (N, d, h, w, K) and z_q; ``nd`` is the encoder's."""
        z, nd = self.encoder(x, aniso_d, 0)
        out = self.quantize(z)
        out["nd"] = nd  # type: ignore[assignment]
        return out

    def decode(self, z_q: torch.Tensor, aniso_d: int, nd: int) -> torch.Tensor:
        x_rec, _ = self.decoder(z_q, aniso_d, nd)
        return x_rec

    def forward(self, x: torch.Tensor, aniso_d: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out = self.tokenize(x, aniso_d)
        out["x_rec"] = self.decode(out["z_q"], aniso_d, int(out["nd"]))
        return out


def convert_official_tokenizer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official PUMIT tokenizer checkpoint -> our keys (spec §7.2).

    Accepts the Fabric payload (``{'model': ...}``) or a bare state dict. The only naming difference is the
    official ``LayerNormNd`` wrapper (``encoder.{1,4,7}.1.*`` -> ``encoder.{1,4,7}.*``).
    """
    if isinstance(sd.get("model"), dict):
        sd = sd["model"]
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"encoder\.(\d+)\.1\.(weight|bias)", key)
        out[f"encoder.{m.group(1)}.{m.group(2)}" if m else key] = value
    return out
