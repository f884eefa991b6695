"""PUMIT universal ViT: 3D RoPE properties and frequencies, SAC patch embedding, MIM forward, downstream adapters."""

from __future__ import annotations

import pytest
import torch

from vocoslicer.models.pumit.adapters import PumitViTClassifier, PumitViTSegmenter, load_backbone
from vocoslicer.models.pumit.mim import PumitMIM
from vocoslicer.models.pumit.rope import Rope3D, rope_frequencies, rotate_half
from vocoslicer.models.pumit.vit import PumitViT, adapt_vit_state_dict, param_groups, vit_config
from vocoslicer.ssl.pumit import random_mim_mask


def test_rope_frequencies_match_spec():
    nu, omega = rope_frequencies(64)
    assert len(nu) == len(omega) == 16
    assert omega[0] == 1.0 and nu[0] == pytest.approx(2333 ** (-1 / 32)) and nu[0] == pytest.approx(0.785, abs=1e-3)
    assert nu[3] == pytest.approx(0.183, abs=1e-3) and omega[3] == pytest.approx(0.178, abs=1e-3)
    assert nu[15] == pytest.approx(5.46e-4, rel=1e-2) and omega[15] == pytest.approx(1.78e-4, rel=1e-2)


def test_rotate_half_interleaved_pairs():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(rotate_half(x), torch.tensor([-2.0, 1.0, -4.0, 3.0]))


def _rotated(rope: Rope3D, vec: torch.Tensor, grid, pos) -> torch.Tensor:
    cos, sin = rope.tables(grid)
    idx = (pos[0] * grid[1] + pos[1]) * grid[2] + pos[2]
    return Rope3D.rotate(vec, cos[idx], sin[idx])


def test_rope_dot_product_depends_only_on_relative_3d_offset():
    torch.manual_seed(0)
    rope = Rope3D(16)
    grid = (6, 7, 8)
    q, k = torch.randn(16, dtype=torch.float64).float(), torch.randn(16).float()
    pairs = [((0, 1, 2), (2, 3, 1)), ((3, 2, 4), (5, 4, 3)), ((1, 4, 6), (3, 6, 5))]  # same offset (2, 2, -1)
    dots = [float(_rotated(rope, q, grid, a) @ _rotated(rope, k, grid, b)) for a, b in pairs]
    assert dots[0] == pytest.approx(dots[1], abs=1e-4) and dots[0] == pytest.approx(dots[2], abs=1e-4)
    other = float(_rotated(rope, q, grid, (0, 1, 2)) @ _rotated(rope, k, grid, (2, 2, 2)))  # another offset
    assert abs(other - dots[0]) > 1e-3
    # rotation preserves norms; d = 0 uses in-plane angles only (EVA-02 2D RoPE)
    v = _rotated(rope, q, grid, (4, 5, 6))
    assert float(v.norm()) == pytest.approx(float(q.norm()), rel=1e-5)
    ang = rope.angles(grid)
    nu, omega = rope_frequencies(16)
    assert torch.allclose(ang[1 * 8 + 3], torch.cat((1 * omega, 3 * omega)).float())  # (d, h, w) = (0, 1, 3)
    last = ang[-1]  # (5, 6, 7)
    assert torch.allclose(last, torch.cat((5 * nu + 6 * omega, 5 * nu + 7 * omega)).float(), atol=1e-5)


def test_vit_same_tokens_for_any_spacing_and_cls_first():
    vit = PumitViT(vit_config("tiny"))
    iso = vit(torch.randn(1, 3, 32, 32, 32), aniso_d=0)
    thick = vit(torch.randn(1, 3, 8, 32, 32), aniso_d=2)
    flat = vit(torch.randn(1, 3, 1, 32, 32), aniso_d=5)
    assert iso.shape == thick.shape == (1, 1 + 8, 32) and flat.shape == (1, 1 + 4, 32)
    keys = set(vit.state_dict())
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.q_proj.weight",
              "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.1.mlp.ffn_ln.weight", "blocks.1.mlp.w3.bias"):
        assert k in keys
    assert "blocks.0.attn.k_bias" not in keys and not any("rope" in k for k in keys)
    b = vit_config("B")
    assert int(b.embed_dim * b.mlp_ratio) == 2048 and int(1024 * vit_config("L").mlp_ratio) == 2730
    groups = param_groups(vit, 0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(vit.pos_embed) in no_decay and id(vit.blocks[0].attn.q_bias) in no_decay
    assert id(vit.blocks[0].attn.q_proj.weight) not in no_decay


def test_mim_forward_and_mae_style_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, 64)
    mask = random_mim_mask(2, 16, 0.55)
    for start in (0, 1):
        mim = PumitMIM(PumitViT(vit_config("tiny")), codebook_size=24, mask_layer_start=start)
        logits = mim(x, 0, mask)
        assert logits.shape == (int(mask.sum()), 24)
        logits.sum().backward()
        assert mim.mask_token.grad is not None and mim.vit.patch_embed.proj.weight.grad is not None
    with pytest.raises(ValueError):
        mim(x, 0, random_mim_mask(2, 8))


def test_backbone_conversion_and_adapters():
    torch.manual_seed(0)
    pre = PumitViT(vit_config("tiny"))  # pre-trained: SAC 16^3 patch, 3 channels
    sd = pre.state_dict()
    seg = PumitViTSegmenter(3, in_channels=1, size="tiny", patch_depth=4, pos_embed_shape=(4, 4, 4),
                            decoder_channels=(8, 8, 16, 16), stem_channels=(4, 8))
    missing, unexpected = load_backbone(seg, sd)
    assert not missing and not unexpected
    w = seg.vit.patch_embed.proj.weight
    expect = sd["patch_embed.proj.weight"].reshape(32, 3, 4, 4, 16, 16).sum(3).sum(1, keepdim=True) / 1
    assert torch.allclose(w, expect, atol=1e-5)  # depth groups of 4 summed, RGB summed / C_new (= 1)
    x = torch.randn(1, 1, 16, 64, 64)
    outs = seg.forward_deep(x)
    assert outs[0].shape == (1, 3, 16, 64, 64) and outs[1].shape == (1, 3, 16, 32, 32)
    assert seg(x).shape == (1, 3, 16, 64, 64)
    cls = PumitViTClassifier(5, in_channels=3, size="tiny", patch_depth=16, pos_embed_shape=(2, 2, 2))
    load_backbone(cls, sd)
    assert cls(torch.randn(2, 3, 32, 32, 32)).shape == (2, 5)
    assert torch.allclose(cls.vit.pos_embed, adapt_vit_state_dict(sd, cls.vit)["pos_embed"])
    assert torch.equal(cls.vit.cls_token.detach(), sd["cls_token"])
