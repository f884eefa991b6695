"""Masked image modelling around :class:`PumitViT` (spec §4): mask token, MLP head to codebook logits.

Masked tokens are replaced by the learnable ``mask_token`` *after* the absolute pos-embed was added, so they keep
RoPE but no absolute position (official behaviour). ``mask_layer_start`` = 0 is BEiT-style (every block sees the
full sequence, ViT-B recipe); > 0 runs the first blocks on visible tokens only (MAE-style, ViT-L recipe: 18).
"""

from __future__ import annotations

import torch
from torch import nn

from vocoslicer.models.pumit.vit import PumitViT, adapt_vit_state_dict, dense_grad

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PumitMIM(nn.Module):
    """ViT + mask token + head ``Linear(C, C) -> GELU -> Linear(C, K)``; returns logits of masked tokens."""

    def __init__(self, vit: PumitViT, codebook_size: int, mask_layer_start: int = 0) -> None:
        super().__init__()
        self.vit = vit
        dim = vit.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.mask_token.register_hook(dense_grad)
        self.mim_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, codebook_size))
        if not 0 <= mask_layer_start < len(vit.blocks):
            raise ValueError(f"mask_layer_start must be in [0, {len(vit.blocks)})")
        self.mask_layer_start = mask_layer_start
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN[: vit.cfg.in_channels]).view(1, -1, 1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD[: vit.cfg.in_channels]).view(1, -1, 1, 1, 1),
                             persistent=False)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """ViT input: the [0, 1] crop with ImageNet mean/std (the tokenizer gets 2x − 1)."""
        return (x01 - self.mean) / self.std

    def forward(self, x: torch.Tensor, aniso_d: int, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``x`` normalised input, ``mask`` (N, L) bool with the same count per row -> logits (n_masked, K)."""
        vit = self.vit
        tokens, grid = vit.embed(x, aniso_d)
        n, length, c = tokens.shape
        if mask.shape != (n, length):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the token count {(n, length)}")
        cos, sin = vit.rope.tables(grid)
        mask_tok = self.mask_token.to(tokens.dtype).expand(n, length, -1)
        if self.mask_layer_start == 0:
            h = vit.with_cls(torch.where(mask.unsqueeze(-1), mask_tok, tokens))
            for i in range(len(vit.blocks)):
                h = vit.run_block(i, h, cos, sin)
        else:
            visible = (~mask).sum(1)
            if not bool((visible == visible[0]).all()):
                raise ValueError("MAE-style layers need the same number of visible tokens per sample")
            vis_idx = (~mask).nonzero()[:, 1].view(n, -1)  # sorted visible positions per row
            gather = vis_idx.unsqueeze(-1)
            h = vit.with_cls(tokens.gather(1, gather.expand(-1, -1, c)))
            hd = cos.shape[-1]
            cos_v = cos[vis_idx].unsqueeze(1)  # (n, 1, V, hd): per-sample rows broadcast over heads
            sin_v = sin[vis_idx].unsqueeze(1)
            assert cos_v.shape[-1] == hd
            for i in range(self.mask_layer_start):
                h = vit.run_block(i, h, cos_v, sin_v)
            full = mask_tok.clone().scatter(1, gather.expand(-1, -1, c), h[:, 1:])
            h = torch.cat((h[:, :1], full), 1)
            for i in range(self.mask_layer_start, len(vit.blocks)):
                h = vit.run_block(i, h, cos, sin)
        h = vit.norm(h[:, 1:])
        return self.mim_head(h[mask])

    def load_pretrained(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """Initialise from an EVA-02 / PUMIT MIM / PUMIT backbone state dict (official MIM starts from EVA-02).

        ViT weights are converted by :func:`adapt_vit_state_dict`; ``mask_token`` and ``mim_head`` are taken when
        their shapes fit (EVA's ``lm_head`` never does). Returns the ViT keys that stayed at their initialisation.
        """
        vit_sd = {k.removeprefix("vit."): v for k, v in sd.items()
                  if not k.startswith(("mask_token", "mim_head.", "lm_head."))}
        result = self.vit.load_state_dict(adapt_vit_state_dict(vit_sd, self.vit), strict=False)
        own = self.state_dict()
        extra = {k: v for k, v in sd.items() if k.startswith(("mask_token", "mim_head.")) and k in own
                 and tuple(v.shape) == tuple(own[k].shape)}
        self.load_state_dict(extra, strict=False)
        return list(result.missing_keys)
